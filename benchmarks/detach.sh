#!/usr/bin/env bash
# Run a long GPU job on the device machine so that it outlives the device call that started it
# (a call may last at most 10 minutes; the machine stays warm between back-to-back calls).
#   benchmarks/detach.sh NAME COMMAND...   starts COMMAND in its own session; log /tmp/NAME.log, exit code /tmp/NAME.rc
#   benchmarks/detach.sh --wait NAME SECONDS   waits until the job ends or SECONDS pass, then prints the log's tail
set -u
if [ "${1:-}" = "--wait" ]; then
    name=$2; limit=$3; waited=0
    while [ ! -f "/tmp/$name.rc" ] && [ "$waited" -lt "$limit" ]; do sleep 5; waited=$((waited + 5)); done
    tail -c 4000 "/tmp/$name.log" | tr '\r' '\n' | tail -n 40
    if [ -f "/tmp/$name.rc" ]; then echo "detach: $name ended with exit code $(cat /tmp/$name.rc)"; exit 0; fi
    echo "detach: $name still running after ${waited}s"; exit 3
fi
name=$1; shift
rm -f "/tmp/$name.rc"
# The exit code is written by the detached shell itself, so it is there even if the starting call has ended.
setsid nohup bash -c '"$@" > "/tmp/$0.log" 2>&1; echo $? > "/tmp/$0.rc"' "$name" "$@" < /dev/null > /dev/null 2>&1 &
echo "detach: started $name (pid $!)"
