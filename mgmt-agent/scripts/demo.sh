#!/bin/sh
# Demo of the management agent on one machine, without the hypervisor: a simulated host (three VMs, one of them
# `unlimited` and bursting), the agent attached over a unix socket, a staged CPU credit pool for the bursting VM,
# and an auto-tiered IOPS commitment. Then run `cvctl top` (q quits).
#
#   cargo build -p mgmt-agent && mgmt-agent/scripts/demo.sh        # sets everything up, prints the next steps
#
# Environment: CVCTL (binary, default $CARGO_TARGET_DIR or target, debug/cvctl), DEMO_DIR (default /tmp/cv-demo),
# CVCTL_API (default 127.0.0.1:7878).
set -eu
B=${CVCTL:-${CARGO_TARGET_DIR:-target}/debug/cvctl}
D=${DEMO_DIR:-/tmp/cv-demo}
API=${CVCTL_API:-127.0.0.1:7878}
export CVCTL_API="$API"
rm -rf "$D" && mkdir -p "$D"

"$B" simhost --listen "unix:$D/host.sock" --host-id sim0 --report "$D/sim.json" 2>"$D/simhost.log" &
echo $! >"$D/simhost.pid"
"$B" agent --db "$D/cv.db" --host "unix:$D/host.sock" --listen "$API" --ready-file "$D/ready" 2>"$D/agent.log" &
echo $! >"$D/agent.pid"

i=0
until [ -s "$D/ready" ] && "$B" vms 2>/dev/null | grep -q sim0; do
    i=$((i + 1))
    [ $i -lt 100 ] || { echo "agent did not come up; see $D/agent.log" >&2; exit 1; }
    sleep 0.1
done

"$B" pool create burst --resource cpu --price 0.05 --discount 100:10 --strategy staged:50:10 --low 0.5 >/dev/null
"$B" pool purchase burst 2 >/dev/null
"$B" pool authorize burst sim0 1 >/dev/null
"$B" commit sim0 3 0 350 --auto >/dev/null

"$B" hosts
"$B" vms
"$B" pools
cat <<MSG

Running: simhost (pid $(cat "$D/simhost.pid")), agent (pid $(cat "$D/agent.pid")), API on $API, state in $D.
  $B top                      live view (q quits)
  $B usage | billing | commitments | notifications | ledger | metrics    (add --json for JSON)
  kill -9 \$(cat $D/agent.pid); $B agent --db $D/cv.db --host unix:$D/host.sock --listen $API &   (crash + restart)
  kill \$(cat $D/agent.pid) \$(cat $D/simhost.pid)     stop
MSG
