//! The kernel end of the management channel (`proto`) on COM2: telemetry out, commands in, credit requests out,
//! credit grants in, exactly once.
//!
//! Design: one [`Endpoint`], owned by the BSP's run loop and polled once per loop iteration ([`Endpoint::poll`]);
//! nothing here ever waits. Each poll moves at most [`RX_BYTES_PER_POLL`] received bytes from the 16550's FIFO
//! into the `proto` [`FrameDecoder`] (an overrun reported by the line status is counted), executes the requests
//! that decoded, drains the scheduler's per-period telemetry and credit requests, sends a telemetry snapshot per VM
//! (per vCPU from the scheduler, per volume from `io::service::volume_stats`, then the link's counters as
//! `LinkStats`) when one is due, re-sends unanswered credit requests, and moves queued output to the transmitter
//! only while its holding register is empty (one FIFO load per poll). Output frames wait in a bounded ring; a frame that does not fit is dropped whole and counted.
//! Answers longer than `proto::SPLIT_ABOVE` bytes go out as `proto::ResponsePart`s (`proto::parts`), but only to
//! an agent that announced `caps::ANSWER_PARTS` with `Command::AgentHello` since the last `Attach`; until then
//! every answer goes whole, as an agent from before parts expects (the compatibility rule in the `proto` docs).
//! The endpoint is enabled with `mgmt=com2` on the command line (docs/console.md) and prints `CV:MGMT` when it
//! comes up and `CV:MGMTSTAT` every second. While it is up an idle BSP halts at most [`IDLE_POLL_NS`] (the
//! receiver is polled, not interrupt driven).
//!
//! The `proto` kernel-endpoint contract (see the `proto` crate docs) is kept as follows:
//! - `Hello` on start-up and before the answer to every `Attach`; the frame session is the low half of a boot id
//!   taken from the TSC at start-up, which differs on every boot.
//! - One decoder and one [`DedupWindow`] for the link: a state-changing request runs only when the window says
//!   `New`; a `Duplicate` gets the cached answer again; a `Stale` id gets `ErrorCode::Stale` and never runs. A
//!   frame that is corrupt, truncated, replayed or malformed never yields a request (the decoder drops and counts
//!   it; the counters are in `CV:MGMTSTAT` and the decoder's stats).
//! - Grants are applied through `sched`'s grant logic, which remembers grant ids: a grant id applies at most once
//!   whatever the request id. Stage `i` of grant `g` is applied under the scheduler grant id `g * MAX_STAGES + i`,
//!   all stages under one scheduler lock after the whole grant was validated, so a grant applies completely or not
//!   at all.
//! - Credit requests come from `sched` (its pool agent logic decides when and how much); each is re-sent with the
//!   same id every [`CREDIT_RESEND_NS`] until a grant naming it, a `DenyCredit`, or a newer request of the same vCPU
//!   replaces it.
//!
//! Invariants: the endpoint never blocks the run loop (every loop is bounded); scheduler locks are taken briefly
//! and never while a VM's lock is held; the credits accepted from grants are counted exactly once
//! (`granted_ns` in `CV:MGMTSTAT`, equal to what the agent debited for this host).

mod commands;

use alloc::collections::VecDeque;
use alloc::vec;
use alloc::vec::Vec;

use drivers::uart16550::{reg, PortIo, Uart16550, LSR_DATA_READY, LSR_THR_EMPTY};
use proto::{
    caps, CommandError, CreditRequest, DecodeStats, DedupWindow, ErrorCode, FrameDecoder,
    FrameEncoder, Hello, LinkStats, Request, Resource, Response, Seen, ToAgent, ToHost,
    VcpuTelemetry, VmDestroyed, VmTelemetry, VolumeTelemetry, MAX_WIRE,
};
use x86_64::instructions::port::Port;

use crate::arch::x86_64::tsc;
use crate::marker;
use crate::vm::Runtime;

use self::commands::Cached;

/// I/O base of COM2.
const COM2_BASE: u16 = 0x2F8;
/// Line speed (8N1).
const BAUD: u32 = 115_200;
/// Host id announced in `Hello`.
pub const HOST_ID: &str = "cv0";
/// Most bytes taken from the receiver per poll.
pub const RX_BYTES_PER_POLL: usize = 256;
/// Transmit FIFO depth of a 16550A: bytes written per poll when the holding register is empty.
const TX_FIFO: usize = 16;
/// Bytes of output queued at most (about 1.4 s of line time at 115200 baud).
const TX_RING: usize = 16 * 1024;
/// Request ids remembered by the dedup window.
const DEDUP: usize = 64;
/// Answers remembered to skip re-answering a retry while its answer is still queued.
const RECENT_ANSWERS: usize = 16;
/// Unanswered credit requests remembered for re-sending.
const MAX_OUTSTANDING: usize = 32;
/// Re-send interval of an unanswered credit request.
pub const CREDIT_RESEND_NS: u64 = 1_000_000_000;
/// Interval of the `CV:MGMTSTAT` line.
const STATS_INTERVAL_NS: u64 = 1_000_000_000;
/// Longest an idle BSP halts while the channel is up (the receiver is polled, not interrupt driven).
pub const IDLE_POLL_NS: u64 = 1_000_000;
/// Line status: overrun error (a received byte was lost).
const LSR_OVERRUN: u8 = 1 << 1;

/// Port I/O on COM2's register file.
#[derive(Debug)]
struct Com2Ports;

impl PortIo for Com2Ports {
    fn read(&mut self, offset: u16) -> u8 {
        // SAFETY: reading a 16550 register at COM2 has no memory side effects.
        unsafe { Port::<u8>::new(COM2_BASE + offset).read() }
    }

    fn write(&mut self, offset: u16, value: u8) {
        // SAFETY: COM2's register file belongs to the management channel; writing it has no memory side effects.
        unsafe { Port::<u8>::new(COM2_BASE + offset).write(value) }
    }
}

/// Per-vCPU telemetry accumulated since the last snapshot (from the scheduler's closed-period records).
#[derive(Clone, Copy, Debug, Default)]
struct Window {
    baseline_ns: u64,
    burst_ns: u64,
    earned_ns: u64,
    spent_ns: u64,
    discarded_ns: u64,
    granted_ns: u64,
    throttled_ns: u64,
    wake_max_ns: u64,
}

/// An unanswered credit request.
#[derive(Clone, Copy, Debug)]
struct Outstanding {
    request: CreditRequest,
    /// Slot of the requesting vCPU.
    slot: usize,
    /// TSC of the next re-send.
    resend_at: u64,
}

/// Counters printed in `CV:MGMTSTAT`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Counters {
    pub rx_bytes: u64,
    pub rx_overruns: u64,
    pub tx_bytes: u64,
    pub tx_frames: u64,
    /// Output frames dropped because the ring was full.
    pub tx_dropped: u64,
    /// Answers sent in parts (`proto::parts`).
    pub answers_in_parts: u64,
    /// Parts sent.
    pub parts: u64,
    /// Retries not answered again because their answer was still queued.
    pub answers_queued_already: u64,
    pub requests: u64,
    /// State-changing requests executed.
    pub executed: u64,
    /// Requests answered from the dedup window (not executed again).
    pub duplicates: u64,
    /// Requests refused as older than the dedup window (not executed).
    pub stale: u64,
    /// Requests answered with an error.
    pub errors: u64,
    pub telemetry: u64,
    /// Credit requests sent for the first time.
    pub credit_requests: u64,
    /// Credit requests sent again under the same id.
    pub credit_resends: u64,
    /// Grants accepted (each grant id once).
    pub grants: u64,
    /// Grants received again and not applied again.
    pub grant_duplicates: u64,
    /// Credits of every accepted grant, all stages.
    pub granted_ns: u64,
    /// Credits of accepted grants that reached the balance at once.
    pub applied_now_ns: u64,
}

/// The management endpoint on COM2.
pub struct Endpoint {
    uart: Uart16550<Com2Ports>,
    lsr: Com2Ports,
    dec: FrameDecoder,
    enc: FrameEncoder,
    dedup: DedupWindow<Cached, DEDUP>,
    tx: VecDeque<u8>,
    /// Most bytes queued in `tx` at once since boot.
    tx_high: usize,
    /// Bytes ever queued in `tx` (`counters.tx_bytes` of them have left): a byte queued at `k` is out once
    /// `tx_bytes >= k`.
    tx_queued_total: u64,
    /// Recent answers: (request id, `tx_queued_total` after its last byte). A retry whose answer is still waiting
    /// in the ring is not answered again (see [`Endpoint::answer`]).
    recent_answers: heapless::Deque<(u64, u64), RECENT_ANSWERS>,
    wire: Vec<u8>,
    /// Postcard bytes of a response being cut into parts.
    scratch: Vec<u8>,
    /// The capabilities the agent announced (`Command::AgentHello`) since the last `Attach`; 0 until then.
    agent_caps: u32,
    boot_id: u64,
    /// Telemetry period, ns (0 = off).
    telemetry_period_ns: u64,
    /// TSC of the next snapshot.
    next_telemetry: u64,
    /// Runtime ns of the previous snapshot.
    last_telemetry_ns: u64,
    tel_seq: u64,
    next_stats: u64,
    /// Per slot.
    windows: Vec<Window>,
    /// Per slot: credits of accepted grants since boot.
    granted_total: Vec<u64>,
    /// Slot by scheduler vCPU id.
    slot_of: Vec<Option<usize>>,
    /// Per VM: its stop was reported (`ToAgent::VmDestroyed` sent; no more telemetry for it).
    gone_reported: Vec<bool>,
    outstanding: Vec<Outstanding>,
    counters: Counters,
}

impl core::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Endpoint")
            .field("boot_id", &self.boot_id)
            .field("counters", &self.counters)
            .finish_non_exhaustive()
    }
}

impl Endpoint {
    /// Brings the channel up when the command line asks for it (`mgmt=com2`) and COM2 answers; `None` otherwise.
    pub fn start(rt: &Runtime) -> Option<alloc::boxed::Box<Self>> {
        let config = crate::config();
        if !config.mgmt {
            return None;
        }
        let mut uart = Uart16550::new(Com2Ports);
        if !uart.is_present() {
            log::error!(
                "mgmt: no UART answers at COM2 ({COM2_BASE:#x}); the management channel is off"
            );
            marker!("MGMT state=absent link=com2");
            return None;
        }
        if let Err(e) = uart.init(BAUD) {
            log::error!("mgmt: COM2 refused {BAUD} baud: {e:?}; the management channel is off");
            return None;
        }
        let now = tsc::rdtsc();
        // The TSC at this point differs on every boot (and on an emulator with the host's clock); mixed so that
        // the low half used as the frame session id differs too.
        let boot_id = now ^ now.rotate_left(32) ^ 0x9E37_79B9_7F4A_7C15;
        let period_ns = u64::from(config.mgmt_telemetry_ms) * 1_000_000;
        #[allow(clippy::cast_possible_truncation)]
        // the session id is the low half of the boot id on purpose
        let session = boot_id as u32;
        let mut ep = alloc::boxed::Box::new(Self {
            uart,
            lsr: Com2Ports,
            dec: FrameDecoder::new(),
            enc: FrameEncoder::new(session, 1),
            dedup: DedupWindow::new(),
            tx: VecDeque::with_capacity(TX_RING),
            tx_high: 0,
            tx_queued_total: 0,
            recent_answers: heapless::Deque::new(),
            wire: vec![0; MAX_WIRE],
            scratch: vec![0; proto::MAX_PAYLOAD],
            agent_caps: 0,
            boot_id,
            telemetry_period_ns: period_ns,
            next_telemetry: rt.after(now, period_ns),
            last_telemetry_ns: rt.ns(now),
            tel_seq: 0,
            next_stats: rt.after(now, STATS_INTERVAL_NS),
            windows: Vec::new(),
            granted_total: Vec::new(),
            slot_of: Vec::new(),
            gone_reported: Vec::new(),
            outstanding: Vec::new(),
            counters: Counters::default(),
        });
        marker!(
            "MGMT state=up link=com2 host={} boot_id={:#x} telemetry_ms={} vms={}",
            HOST_ID,
            boot_id,
            config.mgmt_telemetry_ms,
            rt.vms.len()
        );
        ep.sync_tables(rt);
        let hello = ep.hello();
        ep.send(&ToAgent::Hello(hello));
        Some(ep)
    }

    /// The `Hello` this host sends.
    fn hello(&self) -> Hello {
        Hello {
            host_id: proto::truncated(HOST_ID),
            boot_id: self.boot_id,
            version: proto::PROTOCOL_VERSION,
            capabilities: caps::TELEMETRY
                | caps::CREDIT_REQUESTS
                | caps::IOPS
                | caps::ANSWER_PARTS
                | caps::BALANCE_PAGES,
            telemetry_period_ms: u32::try_from(self.telemetry_period_ns / 1_000_000)
                .unwrap_or(u32::MAX),
        }
    }

    /// The longest the BSP may halt before the next poll.
    pub fn next_due(&self, rt: &Runtime, now: u64) -> u64 {
        rt.after(now, IDLE_POLL_NS)
    }

    /// One bounded round of channel work at TSC `now` (see the module docs).
    pub fn poll(&mut self, rt: &Runtime, now: u64) {
        let mut requests: heapless::Vec<Request, 8> = heapless::Vec::new();
        for _ in 0..RX_BYTES_PER_POLL {
            let lsr = self.lsr.read(reg::LSR);
            if lsr & LSR_OVERRUN != 0 {
                self.counters.rx_overruns += 1;
            }
            if lsr & LSR_DATA_READY == 0 {
                break;
            }
            let Some(byte) = self.uart.try_receive() else {
                break;
            };
            self.counters.rx_bytes += 1;
            if let Some(frame) = self.dec.push::<ToHost>(byte) {
                let ToHost::Request(r) = frame.msg;
                if let Err(r) = requests.push(r) {
                    // Full: run what we have, then this one, keeping the order.
                    for q in core::mem::take(&mut requests) {
                        self.handle(rt, q, now);
                    }
                    self.handle(rt, r, now);
                }
            }
        }
        for r in requests {
            self.handle(rt, r, now);
        }
        self.drain_sched(rt, now);
        self.io_credit_requests();
        if self.telemetry_period_ns > 0 && now >= self.next_telemetry {
            self.telemetry(rt, now);
            // On the period's grid (no drift by the poll's lateness); after a long stall, a period from now.
            self.next_telemetry = rt.after(self.next_telemetry, self.telemetry_period_ns);
            if self.next_telemetry <= now {
                self.next_telemetry = rt.after(now, self.telemetry_period_ns);
            }
        }
        self.resend_credit_requests(rt, now);
        if now >= self.next_stats {
            self.stats_line(rt);
            self.next_stats = rt.after(now, STATS_INTERVAL_NS);
        }
        self.pump();
    }

    /// Moves queued output to the transmitter while its holding register is empty (one FIFO load).
    fn pump(&mut self) {
        if self.tx.is_empty() || self.lsr.read(reg::LSR) & LSR_THR_EMPTY == 0 {
            return;
        }
        for _ in 0..TX_FIFO {
            let Some(b) = self.tx.pop_front() else { break };
            // The holding register (and with it the FIFO) was empty: a FIFO load goes out without waiting.
            self.uart.send(b);
            self.counters.tx_bytes += 1;
        }
    }

    /// Queues one message, or drops it whole (counted) when the ring has no room.
    fn send(&mut self, msg: &ToAgent) {
        match self.enc.encode(msg, &mut self.wire) {
            Ok(n) => {
                if self.tx.len() + n > TX_RING {
                    self.counters.tx_dropped += 1;
                    return;
                }
                self.tx.extend(&self.wire[..n]);
                self.tx_high = self.tx_high.max(self.tx.len());
                self.tx_queued_total += u64::try_from(n).unwrap_or(u64::MAX);
                self.counters.tx_frames += 1;
            }
            Err(e) => {
                self.counters.tx_dropped += 1;
                log::error!("mgmt: cannot encode a message: {e}");
            }
        }
    }

    /// Dedup, execute, answer.
    fn handle(&mut self, rt: &Runtime, req: Request, now: u64) {
        self.counters.requests += 1;
        let result = if req.command.is_state_changing() {
            match self.dedup.check(req.id) {
                Seen::Duplicate(c) => {
                    let result = c.result();
                    self.counters.duplicates += 1;
                    self.answer(req.id, result);
                    return;
                }
                Seen::Stale => {
                    self.counters.stale += 1;
                    self.answer(
                        req.id,
                        Err(CommandError::new(
                            ErrorCode::Stale,
                            "request id older than the host's dedup window; not executed",
                        )),
                    );
                    return;
                }
                Seen::New => {}
            }
            let cached = self.execute_change(rt, &req.command, now);
            self.counters.executed += 1;
            let result = cached.result();
            self.dedup.record(req.id, cached);
            result
        } else {
            if matches!(req.command, proto::Command::Attach) {
                // Possibly another (older) agent: whole answers until it announces what it reads.
                self.agent_caps = 0;
                let hello = self.hello();
                self.send(&ToAgent::Hello(hello));
            }
            self.execute_query(rt, &req.command)
        };
        self.answer(req.id, result);
    }

    /// Sends the answer to request `id`: whole when short, else in parts (`proto::parts`: on a noisy line one
    /// corrupt byte then costs one part, and the agent completes the answer from the parts of its retries).
    ///
    /// A retry that arrives while the previous answer to the same id is still queued is not answered again: that
    /// answer is on its way, and a long one (a page in parts takes up to ~0.4 s of line time) would otherwise be
    /// queued once per retry and fill the ring.
    fn answer(&mut self, id: u64, result: Result<proto::Reply, CommandError>) {
        if result.is_err() {
            self.counters.errors += 1;
        }
        let sent = self.counters.tx_bytes;
        if self
            .recent_answers
            .iter()
            .any(|&(i, end)| i == id && end > sent)
        {
            self.counters.answers_queued_already += 1;
            return;
        }
        let response = Response { id, result };
        let mut scratch = core::mem::take(&mut self.scratch);
        let outgoing = if self.agent_caps & caps::ANSWER_PARTS == 0 {
            // An agent that did not say it reads parts (one from before them) would lose every long answer.
            Ok(proto::Outgoing::Whole)
        } else {
            proto::outgoing(&response, &mut scratch)
        };
        match outgoing {
            Ok(proto::Outgoing::Parts(parts)) => {
                self.counters.answers_in_parts += 1;
                for part in parts {
                    self.counters.parts += 1;
                    self.send(&ToAgent::ResponsePart(part));
                }
            }
            // Short (or not encodable: `send` counts and logs that).
            Ok(proto::Outgoing::Whole) | Err(_) => self.send(&ToAgent::Response(response)),
        }
        self.scratch = scratch;
        if self.recent_answers.is_full() {
            self.recent_answers.pop_front();
        }
        // Room was made above.
        let _ = self.recent_answers.push_back((id, self.tx_queued_total));
    }

    /// Takes the scheduler's closed-period records into the windows and its new credit requests into the
    /// outstanding list (sent at once).
    fn drain_sched(&mut self, rt: &Runtime, now: u64) {
        let (records, requests) = {
            let mut sched = rt.sched.lock();
            (sched.drain_telemetry(), sched.take_credit_requests())
        };
        for r in &records {
            let Some(w) = self.slot(r.vcpu).and_then(|s| self.windows.get_mut(s)) else {
                continue;
            };
            w.baseline_ns = w.baseline_ns.saturating_add(r.baseline_ns);
            w.burst_ns = w.burst_ns.saturating_add(r.burst_ns);
            w.earned_ns = w.earned_ns.saturating_add(r.earned_ns);
            w.spent_ns = w.spent_ns.saturating_add(r.spent_ns);
            w.discarded_ns = w.discarded_ns.saturating_add(r.discarded_ns);
            w.granted_ns = w.granted_ns.saturating_add(r.granted_ns);
            w.throttled_ns = w.throttled_ns.saturating_add(r.throttled_ns);
            w.wake_max_ns = w.wake_max_ns.max(r.max_wake_latency_ns);
        }
        for r in requests {
            let Some(slot) = self.slot(r.vcpu) else {
                continue;
            };
            let s = &rt.slots[slot];
            let request = CreditRequest {
                request_id: r.request_id,
                resource: Resource::Cpu,
                vm: u32::try_from(s.vm).unwrap_or(u32::MAX),
                unit: u16::try_from(s.index).unwrap_or(u16::MAX),
                amount_ns: r.credits_ns,
                balance_ns: r.balance_ns,
            };
            // A newer request of the same vCPU supersedes the old one (the scheduler gave up waiting on it).
            self.outstanding.retain(|o| o.slot != slot);
            if self.outstanding.len() >= MAX_OUTSTANDING {
                self.outstanding.remove(0);
            }
            self.outstanding.push(Outstanding {
                request,
                slot,
                resend_at: rt.after(now, CREDIT_RESEND_NS),
            });
            self.counters.credit_requests += 1;
            self.send(&ToAgent::CreditRequest(request));
        }
    }

    fn resend_credit_requests(&mut self, rt: &Runtime, now: u64) {
        let mut due: heapless::Vec<CreditRequest, MAX_OUTSTANDING> = heapless::Vec::new();
        for o in &mut self.outstanding {
            if now >= o.resend_at {
                o.resend_at = rt.after(now, CREDIT_RESEND_NS);
                // Capacity equals the list's bound.
                let _ = due.push(o.request);
            }
        }
        for r in due {
            self.counters.credit_resends += 1;
            self.send(&ToAgent::CreditRequest(r));
        }
    }

    /// One snapshot per VM, numbered +1 each across the host, then the host's link counters. A VM that has stopped
    /// gets one last snapshot (its final window) followed by `ToAgent::VmDestroyed`, then nothing more.
    fn telemetry(&mut self, rt: &Runtime, now: u64) {
        let time_ns = rt.ns(now);
        let window_ns = time_ns.saturating_sub(self.last_telemetry_ns);
        self.last_telemetry_ns = time_ns;
        let io = crate::io::service::volume_stats();
        for (vm_index, vm) in rt.vms.iter().enumerate() {
            let stopped = vm.stopped();
            if stopped && self.gone_reported.get(vm_index).copied().unwrap_or(true) {
                continue;
            }
            let mut vcpus: heapless::Vec<VcpuTelemetry, { proto::MAX_VCPUS }> =
                heapless::Vec::new();
            {
                let sched = rt.sched.lock();
                for s in vm.slots.clone() {
                    let slot = &rt.slots[s];
                    let w = core::mem::take(&mut self.windows[s]);
                    let (balance_ns, unlimited) =
                        match (sched.status(slot.id), sched.config(slot.id)) {
                            (Ok(st), Ok(cfg)) => (
                                st.balance_ns,
                                matches!(cfg.burst_mode, sched::cpu::BurstMode::Unlimited { .. }),
                            ),
                            _ => (0, false),
                        };
                    let t = VcpuTelemetry {
                        vcpu: u16::try_from(slot.index).unwrap_or(u16::MAX),
                        baseline_ns: w.baseline_ns,
                        burst_ns: w.burst_ns,
                        earned_ns: w.earned_ns,
                        spent_ns: w.spent_ns,
                        discarded_ns: w.discarded_ns,
                        granted_ns: w.granted_ns,
                        balance_ns,
                        throttled_ns: w.throttled_ns,
                        wake_latency_max_ns: w.wake_max_ns,
                        unlimited,
                    };
                    if vcpus.push(t).is_err() {
                        break;
                    }
                }
            }
            self.tel_seq += 1;
            let snapshot = VmTelemetry {
                seq: self.tel_seq,
                time_ns,
                window_ns,
                vm: u32::try_from(vm_index).unwrap_or(u32::MAX),
                vcpus,
                volumes: volumes(&io, &vm.name),
            };
            self.counters.telemetry += 1;
            self.send(&ToAgent::Telemetry(snapshot));
            if stopped {
                if let Some(g) = self.gone_reported.get_mut(vm_index) {
                    *g = true;
                }
                self.send(&ToAgent::VmDestroyed(VmDestroyed {
                    vm: u32::try_from(vm_index).unwrap_or(u32::MAX),
                    last_seq: self.tel_seq,
                    time_ns,
                }));
                marker!("MGMTGONE vm={} last_seq={}", vm.name, self.tel_seq);
            }
        }
        let link = LinkStats {
            decode: self.dec.stats(),
            rx_overruns: self.counters.rx_overruns,
            tx_dropped: self.counters.tx_dropped,
            executed: self.counters.executed,
            duplicates: self.counters.duplicates,
            stale: self.counters.stale,
        };
        self.send(&ToAgent::LinkStats(link));
    }

    /// `CV:MGMTSTAT`: the link's counters, the decoder's rejections and the grant totals.
    fn stats_line(&self, rt: &Runtime) {
        let staged: u64 = {
            let sched = rt.sched.lock();
            rt.slots
                .iter()
                .filter_map(|s| sched.status(s.id).ok())
                .map(|st| st.staged_grant_ns)
                .sum()
        };
        let d: DecodeStats = self.dec.stats();
        let c = &self.counters;
        crate::console::write_line_deferred(format_args!(
            "CV:MGMTSTAT t_ms={} grants={} grant_duplicates={} granted_ns={} applied_now_ns={} staged_ns={} \
             credit_requests={} credit_resends={} outstanding={} requests={} executed={} duplicates={} stale={} \
             errors={} telemetry={} frames={} rejected={} crc={} cobs={} truncated={} oversized={} malformed={} \
             replays={} rx_bytes={} rx_overruns={} tx_bytes={} tx_frames={} tx_dropped={} tx_queued={} tx_high={} \
             answers_in_parts={} parts={} answers_queued_already={}",
            rt.ns(tsc::rdtsc()) / 1_000_000,
            c.grants,
            c.grant_duplicates,
            c.granted_ns,
            c.applied_now_ns,
            staged,
            c.credit_requests,
            c.credit_resends,
            self.outstanding.len(),
            c.requests,
            c.executed,
            c.duplicates,
            c.stale,
            c.errors,
            c.telemetry,
            d.ok,
            d.rejected(),
            d.crc_errors,
            d.cobs_errors,
            d.truncated,
            d.oversized,
            d.malformed,
            d.replays,
            c.rx_bytes,
            c.rx_overruns,
            c.tx_bytes,
            c.tx_frames,
            c.tx_dropped,
            self.tx.len(),
            self.tx_high,
            c.answers_in_parts,
            c.parts,
            c.answers_queued_already
        ));
    }

    /// Prints the final `CV:MGMTSTAT` (end of a `run_ms` run).
    pub fn finish(&mut self, rt: &Runtime) {
        self.drain_sched(rt, tsc::rdtsc());
        self.stats_line(rt);
    }

    /// Sizes the per-VM and per-vCPU tables to the runtime's published VMs and maps scheduler ids to slots (at
    /// start-up and after every VM this endpoint creates; existing entries keep their values).
    fn sync_tables(&mut self, rt: &Runtime) {
        self.windows.resize(rt.slots.len(), Window::default());
        self.granted_total.resize(rt.slots.len(), 0);
        self.gone_reported.resize(rt.vms.len(), false);
        let max_id = rt.slots.iter().map(|s| s.id.0).max().map_or(0, |m| m + 1);
        self.slot_of = vec![None; usize::try_from(max_id).unwrap_or(0)];
        for (i, s) in rt.slots.iter().enumerate() {
            if let Some(e) = usize::try_from(s.id.0)
                .ok()
                .and_then(|k| self.slot_of.get_mut(k))
            {
                *e = Some(i);
            }
        }
    }

    fn slot(&self, id: sched::cpu::VcpuId) -> Option<usize> {
        usize::try_from(id.0)
            .ok()
            .and_then(|k| self.slot_of.get(k).copied().flatten())
    }
}

/// The telemetry of VM `name`'s volumes from the I/O service's last closed windows (queue-wait latency).
fn volumes(
    io: &[crate::io::service::VolumeStats],
    name: &str,
) -> heapless::Vec<VolumeTelemetry, { proto::MAX_VOLUMES }> {
    let sat = |v: u64| u32::try_from(v).unwrap_or(u32::MAX);
    io.iter()
        .filter(|v| v.vm == name && v.attached)
        .take(proto::MAX_VOLUMES)
        .map(|v| VolumeTelemetry {
            volume: u16::try_from(v.index).unwrap_or(u16::MAX),
            iops: sat(v.completed_iops),
            committed_iops: sat(v.committed_iops),
            limit_iops: v.limit_iops.map_or(0, sat),
            latency_p50_ns: v.wait_p50_ns,
            latency_p99_ns: v.wait_p99_ns,
            // The I/O service does not count delayed requests per window.
            throttled: 0,
        })
        .collect()
}
