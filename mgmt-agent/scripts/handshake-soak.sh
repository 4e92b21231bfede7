#!/usr/bin/env bash
# Handshake soak: boots the hypervisor in QEMU (TCG, -cpu EPYC, 2 CPUs, two `burn` VMs, mgmt=com2), puts
# `cvctl proxy` (1500 ppm bit flips, drops and duplications, 2 % chunk replays, seed SEED) between it and
# `cvctl agent`, and waits (bounded) until the agent lists both VMs. Prints one line:
#   seed=SEED result=ok|FAIL list_ms=N reattaches=N host_rx_bytes=N
# Usage: handshake-soak.sh CVCTL KERNEL_ELF32 GUEST_DIR WORKDIR SEED [LIMIT_S]
# Several copies in parallel (distinct WORKDIRs) reproduce the loaded CI runner (issue 8 flake).
set -u
cvctl=$1 kernel=$2 guests=$3 work=$4 seed=$5 limit=${6:-40}
rm -rf "$work" && mkdir -p "$work" && cd "$work" || exit 2
cat > vms.conf <<'CONF'
[vm burster]
image = burn
memory = 8M
baseline = 10%
accrual = 0.1ms
burst = unlimited 200ms
cpu = 1
args = report_ms=1000

[vm steady]
image = burn
memory = 8M
baseline = 30%
cpu = 0
args = report_ms=1000
CONF
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done; wait 2>/dev/null; }
trap cleanup EXIT
timeout 120 qemu-system-x86_64 -machine pc,accel=tcg -cpu EPYC -smp 2 -m 512M -display none -vga none \
  -monitor none -no-reboot -device isa-debug-exit,iobase=0xf4,iosize=0x04 -serial file:serial.log \
  -kernel "$kernel" -append "mgmt=com2 run_ms=100000 exit=emu mgmt_telemetry_ms=250" \
  -chardev "socket,id=mgmt,path=$work/com2.sock,server=on,wait=off" -serial chardev:mgmt \
  -initrd "$guests/burn burn,$work/vms.conf vms.conf" >qemu.log 2>&1 &
pids+=($!)
for _ in $(seq 600); do grep -q "CV:MGMT state=up" serial.log 2>/dev/null && [ -S com2.sock ] && break; sleep 0.1; done
"$cvctl" proxy --listen "unix:$work/proxy.sock" --target "unix:$work/com2.sock" --flip-ppm 1500 \
  --drop-ppm 1500 --dup-ppm 1500 --replay-ppm 20000 --seed "$seed" >proxy.log 2>&1 &
pids+=($!)
for _ in $(seq 100); do [ -S proxy.sock ] && break; sleep 0.1; done
"$cvctl" agent --db "$work/cv.db" --host "unix:$work/proxy.sock" --listen 127.0.0.1:0 \
  --ready-file "$work/agent.ready" >agent.log 2>&1 &
pids+=($!)
for _ in $(seq 100); do [ -s agent.ready ] && break; sleep 0.1; done
api=$(cat agent.ready)
start=$(date +%s%N) result=FAIL
while [ $(( ($(date +%s%N) - start) / 1000000000 )) -lt "$limit" ]; do
  vms=$("$cvctl" --api "$api" --json vms 2>/dev/null)
  if [[ $vms == *'"burster"'* && $vms == *'"steady"'* ]]; then result=ok; break; fi
  sleep 0.2
done
ms=$(( ($(date +%s%N) - start) / 1000000 ))
sleep 1.2
re=$(curl -s "http://$api/metrics" | awk '/^cv_reattaches_total/ {print $2}')
rx=$(grep -o "rx_bytes=[0-9]*" serial.log | tail -1)
echo "seed=$seed result=$result list_ms=$ms reattaches=${re:-n/a} host_${rx:-rx_bytes=?}"
