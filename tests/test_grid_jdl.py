"""``vmwn jdl`` and ``vmwn match``: gLite JDL through the real ClassAd library."""

import os
import subprocess
import sys

import pytest

from vmwn import config
from vmwn.cli import main
from vmwn.errors import UserError
from vmwn.grid import classads, jdl

from test_grid_advertise import make_config

VMWN = os.path.join(os.path.dirname(sys.executable), "vmwn")
RTE = "other.GlueHostApplicationSoftwareRunTimeEnvironment"


def write_jdl(tmp_path, requirements=None, body=None, name="job.jdl"):
    if body is None:
        body = ('[\n  Type = "Job";\n  Executable = "/bin/hostname";\n'
                '  StdOutput = "std.out";\n'
                f"  Requirements = {requirements};\n]\n")
    path = tmp_path / name
    path.write_text(body)
    return str(path)


def run_cli(capsys, *argv):
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture
def conf(tmp_path):
    return str(make_config(tmp_path, present=("tiny",)))


def test_acceptance_jdl_requiring_tiny_prints_the_pbs_request(tmp_path, conf, capsys):
    path = write_jdl(tmp_path, f'Member("VMWN-TINY", {RTE})')
    assert run_cli(capsys, "--config", conf, "jdl", path) == (0, "-l other=vmwn=tiny\n", "")
    cp = subprocess.run([VMWN, "--config", conf, "jdl", path], capture_output=True, text=True,
                        timeout=60)
    assert (cp.returncode, cp.stdout) == (0, "-l other=vmwn=tiny\n")


def test_directives(tmp_path, conf, capsys):
    path = write_jdl(tmp_path, f'Member("VMWN-DEBIAN12", {RTE})')
    rc, out, _ = run_cli(capsys, "--config", conf, "jdl", "--directives", path)
    assert (rc, out) == (0, "#PBS -l other=vmwn=debian12\n")


def test_glite_conveniences_no_brackets_and_comments(tmp_path, conf, capsys):
    body = ("# a gLite JDL without the enclosing brackets\n"
            'Executable = "/bin/echo"; // C++ comment\n'
            'Arguments = "# not a comment";\n'
            "/* block\n# comment */\n"
            f'Requirements = other.GlueCEStateStatus == "Production" &&\n'
            f'  Member("VMWN-TINY", {RTE});\n')
    path = write_jdl(tmp_path, body=body)
    assert run_cli(capsys, "--config", conf, "jdl", path)[:2] == (0, "-l other=vmwn=tiny\n")
    ad = jdl.load(path)
    assert ad.eval("Arguments") == "# not a comment"


def test_tags_compare_case_insensitively(tmp_path, conf, capsys):
    path = write_jdl(tmp_path, f'member("vmwn-tiny", {RTE.lower()})')
    assert run_cli(capsys, "--config", conf, "jdl", path)[:2] == (0, "-l other=vmwn=tiny\n")


@pytest.mark.parametrize("body,what", [
    ("[ Executable = ; ]", "not a valid ClassAd"),
    ('[ Executable = "/bin/sh" ', "not a valid ClassAd"),
    ('[ Requirements = Member("VMWN-TINY", other.X) ] trailing words', "not a valid ClassAd"),
    ('[ a = 1 ] [ Requirements = true ]', "not a valid ClassAd"),
    ('[ Requirements = Member("VMWN-TINY" ]', "not a valid ClassAd"),
    ("", "is empty"),
    ("# only a comment\n", "is empty"),
])
def test_malformed_jdl_is_a_one_line_user_error(tmp_path, conf, capsys, body, what):
    path = write_jdl(tmp_path, body=body)
    rc, out, err = run_cli(capsys, "--config", conf, "jdl", path)
    assert rc == 2 and out == ""
    assert len(err.strip().splitlines()) == 1
    assert what in err and path in err


def test_unreadable_jdl(tmp_path, conf, capsys):
    rc, _, err = run_cli(capsys, "--config", conf, "jdl", str(tmp_path / "nope.jdl"))
    assert rc == 2 and "cannot read JDL" in err


def test_environment_the_site_lacks_names_the_available_ones(tmp_path, conf, capsys):
    path = write_jdl(tmp_path, f'Member("VMWN-NOSUCH", {RTE})')
    rc, out, err = run_cli(capsys, "--config", conf, "jdl", path)
    assert rc == 2 and out == ""
    assert "VMWN-NOSUCH" in err and "VMWN-DEBIAN12, VMWN-TINY" in err
    assert len(err.strip().splitlines()) == 1


def test_two_environments_at_once_conflict(tmp_path, conf, capsys):
    path = write_jdl(tmp_path, f'Member("VMWN-TINY", {RTE}) && Member("VMWN-DEBIAN12", {RTE})')
    rc, _, err = run_cli(capsys, "--config", conf, "jdl", path)
    assert rc == 2
    assert "VMWN-TINY and VMWN-DEBIAN12 at once" in err


def test_alternatives_pick_the_first_the_site_offers(tmp_path, conf, capsys):
    path = write_jdl(tmp_path, f'Member("VMWN-NOSUCH", {RTE}) || Member("VMWN-DEBIAN12", {RTE})'
                     f' || Member("VMWN-TINY", {RTE})')
    assert run_cli(capsys, "--config", conf, "jdl", path)[:2] == (0, "-l other=vmwn=debian12\n")


def test_negated_tag_is_not_a_request(tmp_path, conf, capsys):
    path = write_jdl(tmp_path, f'!Member("VMWN-TINY", {RTE})')
    rc, _, err = run_cli(capsys, "--config", conf, "jdl", path)
    assert rc == 2 and "exclude" in err


def test_negation_beside_a_request(tmp_path, conf, capsys):
    path = write_jdl(tmp_path, f'!Member("VMWN-TINY", {RTE}) && Member("VMWN-DEBIAN12", {RTE})')
    assert run_cli(capsys, "--config", conf, "jdl", path)[:2] == (0, "-l other=vmwn=debian12\n")


def test_no_requirements_or_no_vmwn_tag(tmp_path, conf, capsys):
    path = write_jdl(tmp_path, body='[ Executable = "/bin/sh"; ]')
    rc, _, err = run_cli(capsys, "--config", conf, "jdl", path)
    assert rc == 2 and "no Requirements" in err
    path = write_jdl(tmp_path, 'other.GlueCEStateStatus == "Production"', name="b.jdl")
    rc, _, err = run_cli(capsys, "--config", conf, "jdl", path)
    assert rc == 2 and "name no vmwn environment" in err


def test_match_as_a_broker(tmp_path, conf, capsys):
    path = write_jdl(tmp_path, f'Member("VMWN-TINY", {RTE}) && other.GlueCEInfoLRMSType == "torque"'
                     " && other.GlueHostMainMemoryRAMSize >= 1")
    rc, out, _ = run_cli(capsys, "--config", conf, "match", path)
    assert rc == 0
    assert out == "match: environment tiny (VMWN-TINY), qsub -l other=vmwn=tiny\n"


def test_match_fails_on_other_requirements(tmp_path, conf, capsys):
    path = write_jdl(tmp_path, f'Member("VMWN-TINY", {RTE}) && other.GlueCEInfoLRMSType == "lsf"')
    rc, out, _ = run_cli(capsys, "--config", conf, "match", path)
    assert rc == 1 and out.startswith("no match: Requirements are false")
    path = write_jdl(tmp_path, f'Member("VMWN-TINY", {RTE}) && other.NoSuchAttribute > 3',
                     name="u.jdl")
    rc, out, _ = run_cli(capsys, "--config", conf, "match", path)
    assert rc == 1 and "undefined" in out


def test_match_environment_whose_image_is_missing(tmp_path, conf, capsys):
    path = write_jdl(tmp_path, f'Member("VMWN-DEBIAN12", {RTE})')
    rc, _, err = run_cli(capsys, "--config", conf, "match", path)
    assert rc == 2 and "VMWN-DEBIAN12" in err and "image is missing" in err
    # jdl translates for the configured site; only match looks at this node's images.
    assert run_cli(capsys, "--config", conf, "jdl", path)[0] == 0


def test_match_unknown_and_conflicting(tmp_path, conf, capsys):
    path = write_jdl(tmp_path, f'Member("VMWN-NOSUCH", {RTE})')
    rc, _, err = run_cli(capsys, "--config", conf, "match", path)
    assert rc == 2 and "VMWN-NOSUCH" in err and "VMWN-TINY" in err
    both = str(make_config(tmp_path / "both", present=("tiny", "debian12")))
    path = write_jdl(tmp_path, f'Member("VMWN-TINY", {RTE}) && Member("VMWN-DEBIAN12", {RTE})',
                     name="c.jdl")
    rc, _, err = run_cli(capsys, "--config", both, "match", path)
    assert rc == 2 and "at once" in err


def test_match_without_vmwn_requirement(tmp_path, conf, capsys):
    path = write_jdl(tmp_path, 'other.GlueSiteUniqueID == "EXAMPLE-SITE"')
    assert run_cli(capsys, "--config", conf, "match", path)[:2] == (
        0, "match: no vmwn environment requested\n")


def test_site_ad_carries_the_advertised_tags_and_identifiers(tmp_path):
    cfg = config.load(str(make_config(tmp_path, present=("tiny",))))
    attrs = jdl.site_ad_attrs(cfg)
    assert attrs[jdl.RTE_ATTR] == ["VMWN-TINY"]
    assert attrs["GlueCEUniqueID"] == "ce.example.org:8443/cream-pbs-batch"
    assert attrs["GlueCEInfoHostName"] == "ce.example.org"
    assert attrs["GlueSiteUniqueID"] == "EXAMPLE-SITE"


def test_evaluation_is_three_valued(tmp_path):
    ad = classads.parse_jdl(f'[ Requirements = Member("VMWN-TINY", {RTE}) && other.X == 1; ]')
    def probe(**kw):
        return classads.evaluate(ad, "Requirements", classads.machine_ad(kw))
    assert probe(GlueHostApplicationSoftwareRunTimeEnvironment=["VMWN-TINY"], X=1) is True
    assert probe(GlueHostApplicationSoftwareRunTimeEnvironment=["VMWN-TINY"]) is None
    assert probe(GlueHostApplicationSoftwareRunTimeEnvironment=["OTHER"]) is False


def test_parse_error_is_user_error():
    with pytest.raises(UserError):
        classads.parse_jdl("[ a = ]")
