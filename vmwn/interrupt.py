"""Stop requests: a signal is noted by a handler that never raises, and acted on
where vmwn waits.

A handler that raises fires between any two bytecodes: inside an ``except
Exception`` that swallows it, or between starting a process and recording its
pid, so that teardown never finds that process.  So the job's warden and the
prologue only note SIGTERM here (and wake a ``select`` through the signal
wakeup fd, as the job starter's relay does); their waiting points call
:func:`check` or :func:`sleep`, which raise :class:`Interrupted` at a point
where everything started so far is recorded.
"""

import contextlib
import os
import select
import signal
import time

_pending = []    # signal numbers noted and not yet acted on
_wake = [-1]     # read end of the wakeup pipe while handlers are installed
_installed = []  # the signals whose handler is _note


class Interrupted(BaseException):
    """A stop request reached a waiting point.  Not an error but, like
    KeyboardInterrupt, a BaseException: no ``except Exception`` or ``except
    VmwnError`` on the way out takes it for a failure to retry or to swallow,
    and cleanup that catches BaseException runs and re-raises."""

    def __init__(self, signum):
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name}")


def _note(signum, frame):
    _pending.append(signum)


@contextlib.contextmanager
def noted(*signals):
    """Note ``signals`` (default SIGTERM) while inside, from the main thread; the
    previous handlers come back after.  A request belongs to the stretch of work
    inside: none from before is seen there, and none is left after it."""
    signals = signals or (signal.SIGTERM,)
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    del _pending[:]
    old_wakeup = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    old = {s: signal.signal(s, _note) for s in signals}
    _wake[0] = r
    _installed[:] = signals
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        signal.set_wakeup_fd(old_wakeup)
        _wake[0] = -1
        del _installed[:]
        del _pending[:]
        os.close(r)
        os.close(w)


def forget():
    """In a forked child: the parent's handlers, wakeup fd and requests are not its own."""
    for s in _installed:
        signal.signal(s, signal.SIG_DFL)
    del _installed[:]
    signal.set_wakeup_fd(-1)
    _wake[0] = -1
    del _pending[:]


def requested():
    return bool(_pending)


def check():
    """Raise Interrupted if a stop was requested."""
    if _pending:
        raise Interrupted(_pending[0])


def fd():
    """The descriptor that becomes readable when a signal arrives, or -1 (to add to a
    ``select``; :func:`drain` it after)."""
    return _wake[0]


def drain():
    if _wake[0] >= 0:
        try:
            while os.read(_wake[0], 512):
                pass
        except BlockingIOError:
            pass


def sleep(seconds):
    """``time.sleep`` that ends early, raising Interrupted, when a stop is requested."""
    check()
    if _wake[0] < 0:
        time.sleep(seconds)
    else:
        select.select([_wake[0]], [], [], max(0.0, seconds))
        drain()
    check()
