#!/bin/sh
# A sample batch job.  Submitted with "-l other=vmwn=tiny" it runs in its own VM.
#PBS -N vmwn-demo
cd "$PBS_O_WORKDIR" || exit 1
echo "job $PBS_JOBID running on $(hostname), kernel $(uname -r), as $(id -un) (uid $(id -u))"
echo "input says: $(cat input.txt)"
tr 'a-z' 'A-Z' < input.txt > result.txt
echo "wrote result.txt" >&2
exit 0
