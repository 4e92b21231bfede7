//! `simhost`: a host simulator that speaks the management protocol, so the agent is tested end to end without
//! the kernel.
//!
//! Design: a virtual host with VMs, vCPUs and volumes advanced in fixed ticks (one tick = one scheduling period
//! of the simulated vCPUs; real time drives the ticks). Per tick and vCPU, the credit model follows issue 3: the
//! accrual is added (anything above the cap is discarded), staged grant credits are released, the demand is
//! served up to the baseline, and time above the baseline is paid from the balance nanosecond for nanosecond; what
//! the balance cannot pay is throttled. An `unlimited` vCPU whose balance cannot cover its demand above baseline
//! for half a request horizon sends a credit request for a full horizon, retries the same request id until it
//! is granted or denied, and backs off after a denial. Volumes get their commitment first, then share the rest of
//! the device capacity; commitments pass an admission check against the committable capacity.
//!
//! Invariants (checked by the end-to-end tests):
//! - A grant id is applied at most once; `applied_ns + pending_ns == received_ns` at all times, and pool grants
//!   are added to the balance without the cap, so every credit the agent debits is accounted for exactly.
//! - State-changing commands go through a [`proto::DedupWindow`]; a duplicate gets the cached response.
//! - Answers go in parts only on a connection whose agent announced `caps::ANSWER_PARTS` (`AgentHello`) since
//!   its last `Attach`, as on the kernel. [`SimConfig::old_host`] and [`SimConfig::protocol_version`] make it a
//!   host from before the negotiation or of another protocol version, for the compatibility tests.
//! - Every executed command is logged (request id and command) so tests can prove no wrong command ran.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proto::{
    BurstMode, Command, CommandError, CreditRequest, DedupWindow, ErrorCode, Event, FrameDecoder,
    FrameEncoder, Grant, Hello, Instruction, Reply, Request, Resource, Response, SchedParams, Seen,
    ToAgent, ToHost, VcpuBalance, VcpuTelemetry, VmInfo, VmState, VmSummary, VmTelemetry,
    VolumeInfo, VolumeTelemetry,
};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::link::{Address, Listener};

/// Modules "loaded" on the simulated host, from which VMs can be created.
pub const MODULES: &[&str] = &["idle", "busy"];

/// A simulated vCPU's configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SimVcpuSpec {
    /// Scheduling parameters (the period is the simulator tick).
    pub params: SchedParams,
    /// Balance at start.
    pub launch_balance_ns: i64,
    /// Demand in percent of one CPU (0..=100).
    pub demand_pct: u32,
}

/// A simulated volume.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SimVolumeSpec {
    /// Committed IOPS at start.
    pub committed_iops: u32,
    /// Limit (0 = none).
    pub limit_iops: u32,
    /// Offered load in IOPS.
    pub demand_iops: u32,
}

/// A simulated VM.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SimVmSpec {
    /// Name.
    pub name: String,
    /// vCPUs.
    pub vcpus: Vec<SimVcpuSpec>,
    /// Volumes.
    pub volumes: Vec<SimVolumeSpec>,
}

/// Simulator configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SimConfig {
    /// Host id.
    pub host_id: String,
    /// Boot id.
    pub boot_id: u64,
    /// Real and simulated length of one tick, ms.
    pub tick_ms: u64,
    /// Ticks between telemetry snapshots at start.
    pub telemetry_ticks: u32,
    /// Ticks before an unanswered credit request is re-sent (same id).
    pub retry_ticks: u32,
    /// Credits asked for cover this many ticks of demand above baseline.
    pub horizon_ticks: u32,
    /// Ticks to wait after a denial before asking again.
    pub deny_backoff_ticks: u32,
    /// Ticks after which a `MigrationComplete` stage is released.
    pub migration_ticks: u32,
    /// Physical CPUs (admission of baselines).
    pub cpus: u32,
    /// Device capacity in IOPS.
    pub device_iops: u32,
    /// Committable percent of the capacity.
    pub committable_pct: u32,
    /// VMs at start (all running).
    pub vms: Vec<SimVmSpec>,
    /// Send long answers whole, as hosts did before `proto::parts` (tests compare the two).
    #[serde(default)]
    pub whole_answers: bool,
    /// Behave as a host from before answer parts, balance pages and `AgentHello`: its Hello announces none of
    /// them, it drops `AgentHello` and `ReadBalancesFrom` as malformed frames (its decoder does not know them) and
    /// answers whole (compatibility tests).
    #[serde(default)]
    pub old_host: bool,
    /// Protocol version stamped on frames and Hello (`None`: `proto::PROTOCOL_VERSION`). Any other value stands
    /// for a host of another protocol version: it also refuses every frame of this build.
    #[serde(default)]
    pub protocol_version: Option<u8>,
}

impl SimConfig {
    /// The demo host: an `unlimited` bursting VM, a `standard` one, a quiet one, and volumes.
    #[must_use]
    pub fn demo(host_id: &str, tick_ms: u64) -> Self {
        let tick_ns = tick_ms * 1_000_000;
        let vcpu = |pct_base: u64, demand_pct, unlimited, launch_ticks: i64| SimVcpuSpec {
            params: SchedParams {
                budget_ns: tick_ns * pct_base / 100,
                period_ns: tick_ns,
                accrual_ns: tick_ns * pct_base / 100 / 4,
                cap_ns: tick_ns * 100,
                burst: if unlimited {
                    BurstMode::Unlimited
                } else {
                    BurstMode::Standard
                },
                weight: 256,
            },
            launch_balance_ns: launch_ticks * i64::try_from(tick_ns).unwrap_or(0),
            demand_pct,
        };
        Self {
            host_id: host_id.into(),
            boot_id: now_ms().unsigned_abs(),
            tick_ms,
            telemetry_ticks: 10,
            retry_ticks: 50,
            horizon_ticks: 50,
            deny_backoff_ticks: 50,
            migration_ticks: 100,
            cpus: 2,
            device_iops: 2000,
            committable_pct: 80,
            vms: vec![
                SimVmSpec {
                    name: "burst-unlimited".into(),
                    vcpus: vec![vcpu(20, 100, true, 5)],
                    volumes: vec![SimVolumeSpec {
                        committed_iops: 350,
                        limit_iops: 0,
                        demand_iops: 300,
                    }],
                },
                SimVmSpec {
                    name: "web-standard".into(),
                    vcpus: vec![vcpu(20, 60, false, 20), vcpu(20, 10, false, 0)],
                    volumes: vec![SimVolumeSpec {
                        committed_iops: 500,
                        limit_iops: 900,
                        demand_iops: 700,
                    }],
                },
                SimVmSpec {
                    name: "quiet".into(),
                    vcpus: vec![vcpu(10, 5, false, 0)],
                    volumes: vec![SimVolumeSpec {
                        committed_iops: 200,
                        limit_iops: 0,
                        demand_iops: 40,
                    }],
                },
            ],
            whole_answers: false,
            old_host: false,
            protocol_version: None,
        }
    }
}

#[derive(Debug, Clone)]
struct PendingStage {
    grant_id: u64,
    remaining_ns: u64,
    instruction: Instruction,
    age_ticks: u32,
}

#[derive(Debug, Clone, Default)]
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

#[derive(Debug, Clone)]
struct SimVcpu {
    params: SchedParams,
    balance_ns: i64,
    demand_pct: u32,
    pending: Vec<PendingStage>,
    granted_total_ns: u64,
    window: Window,
    outstanding: Option<(u64, u32)>,
    backoff: u32,
    last_burst_ns: u64,
}

#[derive(Debug, Clone)]
struct SimVolume {
    committed_iops: u32,
    limit_iops: u32,
    demand_iops: u32,
    served_ops: u64,
    throttled: u32,
    last_iops: u32,
}

#[derive(Debug, Clone)]
struct SimVm {
    id: u32,
    name: String,
    module: String,
    state: VmState,
    vcpus: Vec<SimVcpu>,
    volumes: Vec<SimVolume>,
    /// Destroyed and reported so (`ToAgent::VmDestroyed` sent): no more telemetry, as the kernel does.
    gone: bool,
}

/// Totals the tests compare against the agent's ledger.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct SimTotals {
    /// Distinct grants accepted.
    pub grants: u64,
    /// Credits of accepted grants.
    pub received_ns: u64,
    /// Of which added to balances.
    pub applied_ns: u64,
    /// Of which still staged.
    pub pending_ns: u64,
    /// Grants whose id had already been applied (ignored).
    pub duplicate_grants: u64,
    /// Grants refused (unknown VM/vCPU).
    pub refused_grants: u64,
    /// Credit requests sent (including retries).
    pub credit_requests_sent: u64,
    /// Denials received.
    pub denials: u64,
    /// Commands executed (state-changing, after dedup).
    pub commands_executed: u64,
    /// Duplicate requests answered from the dedup window.
    pub duplicate_requests: u64,
    /// Stale requests refused.
    pub stale_requests: u64,
    /// Agent connections accepted.
    pub connections: u64,
    /// Frames rejected by the decoder (all sessions).
    pub frames_rejected: u64,
}

/// Per-vCPU view for reports.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SimVcpuReport {
    /// VM.
    pub vm: u32,
    /// vCPU.
    pub vcpu: u16,
    /// Balance.
    pub balance_ns: i64,
    /// Burst served in the last tick.
    pub last_burst_ns: u64,
    /// Unlimited mode.
    pub unlimited: bool,
    /// Total granted.
    pub granted_total_ns: u64,
}

/// Snapshot of the simulator for tests and the `--report` file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SimReport {
    /// Ticks run.
    pub ticks: u64,
    /// Totals.
    pub totals: SimTotals,
    /// vCPUs.
    pub vcpus: Vec<SimVcpuReport>,
    /// Every executed state-changing command: (request id, debug text).
    pub executed: Vec<(u64, String)>,
    /// Grants applied: (grant id, credits).
    pub grants: Vec<(u64, u64)>,
}

/// The simulator state.
#[derive(Debug)]
pub struct SimState {
    cfg: SimConfig,
    vms: Vec<SimVm>,
    next_vm: u32,
    applied_grants: HashSet<u64>,
    grant_log: Vec<(u64, u64)>,
    dedup: DedupWindow<Response, 64>,
    next_credit_req: u64,
    tel_seq: u64,
    telemetry_ticks: u32,
    ticks: u64,
    totals: SimTotals,
    executed: Vec<(u64, String)>,
    out: Option<mpsc::UnboundedSender<ToAgent>>,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn err(code: ErrorCode, msg: &str) -> CommandError {
    CommandError::new(code, msg)
}

fn mul_div(a: u64, b: u64, c: u64) -> u64 {
    if c == 0 {
        return 0;
    }
    u64::try_from(u128::from(a) * u128::from(b) / u128::from(c)).unwrap_or(u64::MAX)
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl SimState {
    /// Builds the simulator from its configuration.
    #[must_use]
    pub fn new(cfg: SimConfig) -> Self {
        let vms: Vec<SimVm> = cfg
            .vms
            .iter()
            .enumerate()
            .map(|(i, v)| SimVm {
                id: u32::try_from(i + 1).unwrap_or(u32::MAX),
                name: v.name.clone(),
                module: "busy".into(),
                state: VmState::Running,
                gone: false,
                vcpus: v
                    .vcpus
                    .iter()
                    .map(|c| SimVcpu {
                        params: c.params,
                        balance_ns: c.launch_balance_ns,
                        demand_pct: c.demand_pct.min(100),
                        pending: Vec::new(),
                        granted_total_ns: 0,
                        window: Window::default(),
                        outstanding: None,
                        backoff: 0,
                        last_burst_ns: 0,
                    })
                    .collect(),
                volumes: v
                    .volumes
                    .iter()
                    .map(|s| SimVolume {
                        committed_iops: s.committed_iops,
                        limit_iops: s.limit_iops,
                        demand_iops: s.demand_iops,
                        served_ops: 0,
                        throttled: 0,
                        last_iops: 0,
                    })
                    .collect(),
            })
            .collect();
        let next_vm = u32::try_from(vms.len() + 1).unwrap_or(u32::MAX);
        let telemetry_ticks = cfg.telemetry_ticks.max(1);
        Self {
            cfg,
            vms,
            next_vm,
            applied_grants: HashSet::new(),
            grant_log: Vec::new(),
            dedup: DedupWindow::new(),
            next_credit_req: 1,
            tel_seq: 0,
            telemetry_ticks,
            ticks: 0,
            totals: SimTotals::default(),
            executed: Vec::new(),
            out: None,
        }
    }

    /// Changes a vCPU's demand (tests and scenarios).
    pub fn set_demand(&mut self, vm: u32, vcpu: usize, pct: u32) {
        if let Some(c) = self
            .vms
            .iter_mut()
            .find(|v| v.id == vm)
            .and_then(|v| v.vcpus.get_mut(vcpu))
        {
            c.demand_pct = pct.min(100);
        }
    }

    /// Changes a volume's offered load.
    pub fn set_io_demand(&mut self, vm: u32, volume: usize, iops: u32) {
        if let Some(v) = self
            .vms
            .iter_mut()
            .find(|v| v.id == vm)
            .and_then(|v| v.volumes.get_mut(volume))
        {
            v.demand_iops = iops;
        }
    }

    /// A report of the current state.
    #[must_use]
    pub fn report(&self) -> SimReport {
        let mut totals = self.totals.clone();
        totals.pending_ns = self
            .vms
            .iter()
            .flat_map(|v| v.vcpus.iter())
            .flat_map(|c| c.pending.iter())
            .map(|p| p.remaining_ns)
            .sum();
        SimReport {
            ticks: self.ticks,
            totals,
            vcpus: self
                .vms
                .iter()
                .flat_map(|v| {
                    v.vcpus.iter().enumerate().map(move |(i, c)| SimVcpuReport {
                        vm: v.id,
                        vcpu: u16::try_from(i).unwrap_or(u16::MAX),
                        balance_ns: c.balance_ns,
                        last_burst_ns: c.last_burst_ns,
                        unlimited: c.params.burst == BurstMode::Unlimited,
                        granted_total_ns: c.granted_total_ns,
                    })
                })
                .collect(),
            executed: self.executed.clone(),
            grants: self.grant_log.clone(),
        }
    }

    fn hello(&self) -> Hello {
        Hello {
            host_id: proto::truncated(&self.cfg.host_id),
            boot_id: self.cfg.boot_id,
            version: self.cfg.protocol_version.unwrap_or(proto::PROTOCOL_VERSION),
            capabilities: proto::caps::TELEMETRY
                | proto::caps::CREDIT_REQUESTS
                | proto::caps::IOPS
                | proto::caps::CREATE_VM
                | if self.cfg.old_host {
                    0
                } else {
                    proto::caps::ANSWER_PARTS | proto::caps::BALANCE_PAGES
                },
            telemetry_period_ms: u32::try_from(u64::from(self.telemetry_ticks) * self.cfg.tick_ms)
                .unwrap_or(u32::MAX),
        }
    }

    fn send(&self, m: ToAgent) {
        if let Some(tx) = &self.out {
            let _ = tx.send(m);
        }
    }

    /// Advances one tick.
    pub fn tick(&mut self) {
        self.ticks += 1;
        let tick_ns = self.cfg.tick_ms * 1_000_000;
        let horizon = u64::from(self.cfg.horizon_ticks.max(1));
        let mut requests = Vec::new();
        for vm in &mut self.vms {
            let running = vm.state == VmState::Running;
            for (i, c) in vm.vcpus.iter_mut().enumerate() {
                // Accrual, capped (discards counted).
                let room = to_i64(c.params.cap_ns)
                    .saturating_sub(c.balance_ns)
                    .max(0)
                    .unsigned_abs();
                let add = c.params.accrual_ns.min(room);
                c.balance_ns = c.balance_ns.saturating_add(to_i64(add));
                c.window.earned_ns += add;
                c.window.discarded_ns += c.params.accrual_ns - add;
                // Staged grant releases (beyond the cap: pool credits are never discarded).
                for p in &mut c.pending {
                    p.age_ticks += 1;
                    let release = match p.instruction {
                        Instruction::Now => p.remaining_ns,
                        Instruction::Rate { per_period_ns } => per_period_ns.min(p.remaining_ns),
                        Instruction::AfterEvent(Event::MigrationComplete) => {
                            if p.age_ticks >= self.cfg.migration_ticks {
                                p.remaining_ns
                            } else {
                                0
                            }
                        }
                        Instruction::AfterEvent(Event::Resumed) => 0,
                    };
                    p.remaining_ns -= release;
                    c.balance_ns = c.balance_ns.saturating_add(to_i64(release));
                    c.window.granted_ns += release;
                    self.totals.applied_ns += release;
                }
                c.pending.retain(|p| p.remaining_ns > 0);
                if !running {
                    c.last_burst_ns = 0;
                    continue;
                }
                let demand = mul_div(tick_ns, u64::from(c.demand_pct), 100);
                let baseline =
                    mul_div(tick_ns, c.params.budget_ns, c.params.period_ns.max(1)).min(tick_ns);
                let base = demand.min(baseline);
                let want = demand - base;
                let burst = want.min(c.balance_ns.max(0).unsigned_abs());
                c.balance_ns -= to_i64(burst);
                c.last_burst_ns = burst;
                c.window.baseline_ns += base;
                c.window.burst_ns += burst;
                c.window.spent_ns += burst;
                c.window.throttled_ns += want - burst;
                if want > burst {
                    // Runnable but held back: it waits for the next period to run again.
                    c.window.wake_max_ns = c.window.wake_max_ns.max(tick_ns - base - burst);
                }
                if c.params.burst != BurstMode::Unlimited {
                    continue;
                }
                // Credit-pool agent logic: ask when the balance cannot cover half a horizon of demand.
                let unit = u16::try_from(i).unwrap_or(u16::MAX);
                let pending: u64 = c.pending.iter().map(|p| p.remaining_ns).sum();
                let covered = c.balance_ns.max(0).unsigned_abs() + pending;
                if let Some((id, age)) = c.outstanding.as_mut() {
                    *age += 1;
                    if *age >= self.cfg.retry_ticks {
                        *age = 0;
                        requests.push(CreditRequest {
                            request_id: *id,
                            resource: Resource::Cpu,
                            vm: vm.id,
                            unit,
                            amount_ns: (want * horizon).saturating_sub(covered).max(1),
                            balance_ns: c.balance_ns,
                        });
                    }
                } else if c.backoff > 0 {
                    c.backoff -= 1;
                } else if want > 0 && covered < want * horizon / 2 {
                    let id = self.next_credit_req;
                    self.next_credit_req += 1;
                    c.outstanding = Some((id, 0));
                    requests.push(CreditRequest {
                        request_id: id,
                        resource: Resource::Cpu,
                        vm: vm.id,
                        unit,
                        amount_ns: want * horizon - covered,
                        balance_ns: c.balance_ns,
                    });
                }
            }
            // Volumes: commitments first, then the rest of the device shared equally.
            let tick_s_num = self.cfg.tick_ms;
            for v in &mut vm.volumes {
                let offered = if running { v.demand_iops } else { 0 };
                let cap = if v.limit_iops > 0 {
                    offered.min(v.limit_iops)
                } else {
                    offered
                };
                v.last_iops = cap;
                v.throttled = v.throttled.saturating_add(offered - cap);
                v.served_ops += u64::from(cap) * tick_s_num / 1000;
            }
        }
        // Device capacity: scale down best-effort parts if the total exceeds it.
        let total: u64 = self
            .vms
            .iter()
            .flat_map(|v| v.volumes.iter())
            .map(|v| u64::from(v.last_iops))
            .sum();
        let cap = u64::from(self.cfg.device_iops);
        if total > cap {
            let committed: u64 = self
                .vms
                .iter()
                .flat_map(|v| v.volumes.iter())
                .map(|v| u64::from(v.last_iops.min(v.committed_iops)))
                .sum();
            let extra_total = total - committed;
            let extra_room = cap.saturating_sub(committed);
            for v in self.vms.iter_mut().flat_map(|v| v.volumes.iter_mut()) {
                let c = v.last_iops.min(v.committed_iops);
                let extra = u64::from(v.last_iops - c);
                let got =
                    u32::try_from(mul_div(extra, extra_room, extra_total)).unwrap_or(u32::MAX);
                v.throttled = v.throttled.saturating_add(v.last_iops - c - got);
                v.last_iops = c + got;
            }
        }
        self.totals.credit_requests_sent += u64::try_from(requests.len()).unwrap_or(0);
        for r in requests {
            self.send(ToAgent::CreditRequest(r));
        }
        if self.ticks.is_multiple_of(u64::from(self.telemetry_ticks)) {
            self.emit_telemetry();
        }
    }

    fn emit_telemetry(&mut self) {
        let window_ns = u64::from(self.telemetry_ticks) * self.cfg.tick_ms * 1_000_000;
        let time_ns = self.ticks * self.cfg.tick_ms * 1_000_000;
        let util: u64 = self
            .vms
            .iter()
            .flat_map(|v| v.volumes.iter())
            .map(|v| u64::from(v.last_iops))
            .sum();
        let cap = u64::from(self.cfg.device_iops.max(1));
        // M/M/1 model of the device (service rate = capacity): the sojourn time is exponential with mean
        // T = s / (1 - rho), so its p-quantile is -ln(1 - p) T: p50 = 0.693 T, p99 = 4.605 T.
        let service_ns = 1_000_000_000 / cap;
        let rho_pct = (util * 100 / cap).min(99);
        let mean = service_ns * 100 / (100 - rho_pct);
        let (p50, p99) = (mean * 693 / 1000, mean * 4605 / 1000);
        let mut msgs = Vec::new();
        for vm in &mut self.vms {
            if vm.gone {
                continue;
            }
            self.tel_seq += 1;
            let vcpus = vm
                .vcpus
                .iter_mut()
                .enumerate()
                .map(|(i, c)| {
                    let w = std::mem::take(&mut c.window);
                    VcpuTelemetry {
                        vcpu: u16::try_from(i).unwrap_or(u16::MAX),
                        baseline_ns: w.baseline_ns,
                        burst_ns: w.burst_ns,
                        earned_ns: w.earned_ns,
                        spent_ns: w.spent_ns,
                        discarded_ns: w.discarded_ns,
                        granted_ns: w.granted_ns,
                        balance_ns: c.balance_ns,
                        throttled_ns: w.throttled_ns,
                        wake_latency_max_ns: w.wake_max_ns,
                        unlimited: c.params.burst == BurstMode::Unlimited,
                    }
                })
                .take(proto::MAX_VCPUS)
                .collect();
            let volumes = vm
                .volumes
                .iter_mut()
                .enumerate()
                .map(|(i, v)| VolumeTelemetry {
                    volume: u16::try_from(i).unwrap_or(u16::MAX),
                    iops: v.last_iops,
                    committed_iops: v.committed_iops,
                    limit_iops: v.limit_iops,
                    latency_p50_ns: p50,
                    latency_p99_ns: p99,
                    throttled: std::mem::take(&mut v.throttled),
                })
                .take(proto::MAX_VOLUMES)
                .collect();
            msgs.push(ToAgent::Telemetry(VmTelemetry {
                seq: self.tel_seq,
                time_ns,
                window_ns,
                vm: vm.id,
                vcpus,
                volumes,
            }));
            if vm.state == VmState::Destroyed {
                vm.gone = true;
                msgs.push(ToAgent::VmDestroyed(proto::VmDestroyed {
                    vm: vm.id,
                    last_seq: self.tel_seq,
                    time_ns,
                }));
            }
        }
        for m in msgs {
            self.send(m);
        }
    }

    /// Handles one request: dedup, execute, respond.
    pub fn handle_request(&mut self, req: Request) {
        let state_changing = req.command.is_state_changing();
        if state_changing {
            match self.dedup.check(req.id) {
                Seen::Duplicate(r) => {
                    let r = r.clone();
                    self.totals.duplicate_requests += 1;
                    self.send(ToAgent::Response(r));
                    return;
                }
                Seen::Stale => {
                    self.totals.stale_requests += 1;
                    self.send(ToAgent::Response(Response {
                        id: req.id,
                        result: Err(err(
                            ErrorCode::Stale,
                            "request id older than the dedup window; not executed",
                        )),
                    }));
                    return;
                }
                Seen::New => {}
            }
            self.totals.commands_executed += 1;
            self.executed.push((req.id, format!("{:?}", req.command)));
        }
        let result = self.execute(req.command);
        let resp = Response { id: req.id, result };
        if state_changing {
            self.dedup.record(req.id, resp.clone());
        }
        self.send(ToAgent::Response(resp));
    }

    fn vm_mut(&mut self, vm: u32) -> Result<&mut SimVm, CommandError> {
        self.vms
            .iter_mut()
            .find(|v| v.id == vm && v.state != VmState::Destroyed)
            .ok_or_else(|| err(ErrorCode::NotFound, &format!("no VM {vm}")))
    }

    fn cpu_util_ppm(&self, skip: Option<(u32, usize)>) -> u64 {
        self.vms
            .iter()
            .filter(|v| v.state != VmState::Destroyed)
            .flat_map(|v| v.vcpus.iter().enumerate().map(move |(i, c)| (v.id, i, c)))
            .filter(|(vm, i, _)| skip != Some((*vm, *i)))
            .map(|(_, _, c)| mul_div(c.params.budget_ns, 1_000_000, c.params.period_ns.max(1)))
            .sum()
    }

    fn check_params(
        &self,
        p: &SchedParams,
        skip: Option<(u32, usize)>,
    ) -> Result<(), CommandError> {
        if !(100_000..=1_000_000_000).contains(&p.period_ns)
            || p.budget_ns == 0
            || p.budget_ns > p.period_ns
        {
            return Err(err(
                ErrorCode::Invalid,
                "period must be 100us..=1s and 0 < budget <= period",
            ));
        }
        let new = mul_div(p.budget_ns, 1_000_000, p.period_ns);
        let used = self.cpu_util_ppm(skip);
        let cap = u64::from(self.cfg.cpus) * 1_000_000;
        if used + new > cap {
            return Err(err(
                ErrorCode::Admission,
                &format!(
                    "baseline utilisation {}+{} ppm exceeds {} ppm of {} CPUs",
                    used, new, cap, self.cfg.cpus
                ),
            ));
        }
        Ok(())
    }

    fn execute(&mut self, cmd: Command) -> Result<Reply, CommandError> {
        match cmd {
            Command::Attach => {
                self.send(ToAgent::Hello(self.hello()));
                Ok(Reply::Ack)
            }
            // What the agent reads is kept per connection by `serve`, which sees the command first.
            Command::AgentHello { .. } => Ok(Reply::Ack),
            // Destroyed VMs stay listed as `Destroyed`, as on the kernel (their ids are not reused).
            Command::ListVms => Ok(Reply::VmList(
                self.vms
                    .iter()
                    .map(|v| VmSummary {
                        vm: v.id,
                        name: proto::truncated(&v.name),
                        state: v.state,
                        vcpus: u16::try_from(v.vcpus.len()).unwrap_or(u16::MAX),
                    })
                    .take(proto::MAX_VMS)
                    .collect(),
            )),
            Command::ListVmsFrom { first } => Ok(proto::vm_page(
                self.vms.iter().map(|v| VmSummary {
                    vm: v.id,
                    name: proto::truncated(&v.name),
                    state: v.state,
                    vcpus: u16::try_from(v.vcpus.len()).unwrap_or(u16::MAX),
                }),
                first,
            )),
            Command::DescribeVm { vm } => {
                let v = self.vm_mut(vm)?;
                Ok(Reply::VmInfo(VmInfo {
                    summary: VmSummary {
                        vm,
                        name: proto::truncated(&v.name),
                        state: v.state,
                        vcpus: u16::try_from(v.vcpus.len()).unwrap_or(u16::MAX),
                    },
                    module: proto::truncated(&v.module),
                    vcpus: v
                        .vcpus
                        .iter()
                        .map(|c| c.params)
                        .take(proto::MAX_VCPUS)
                        .collect(),
                    volumes: v
                        .volumes
                        .iter()
                        .enumerate()
                        .map(|(i, s)| VolumeInfo {
                            volume: u16::try_from(i).unwrap_or(u16::MAX),
                            committed_iops: s.committed_iops,
                            limit_iops: s.limit_iops,
                        })
                        .take(proto::MAX_VOLUMES)
                        .collect(),
                }))
            }
            Command::CreateVm {
                module,
                name,
                vcpus,
            } => {
                if !MODULES.contains(&module.as_str()) {
                    return Err(err(
                        ErrorCode::NotFound,
                        &format!("module '{module}' is not loaded"),
                    ));
                }
                if vcpus.is_empty() {
                    return Err(err(ErrorCode::Invalid, "a VM needs at least one vCPU"));
                }
                let mut extra = 0;
                for p in &vcpus {
                    self.check_params(p, None)?;
                    extra += mul_div(p.budget_ns, 1_000_000, p.period_ns);
                }
                let cap = u64::from(self.cfg.cpus) * 1_000_000;
                if self.cpu_util_ppm(None) + extra > cap {
                    return Err(err(
                        ErrorCode::Admission,
                        &format!("VM baselines need {extra} ppm; no room"),
                    ));
                }
                let id = self.next_vm;
                self.next_vm += 1;
                self.vms.push(SimVm {
                    id,
                    name: name.as_str().into(),
                    module: module.as_str().into(),
                    state: VmState::Created,
                    gone: false,
                    vcpus: vcpus
                        .iter()
                        .map(|p| SimVcpu {
                            params: *p,
                            balance_ns: 0,
                            demand_pct: if module.as_str() == "busy" { 100 } else { 0 },
                            pending: Vec::new(),
                            granted_total_ns: 0,
                            window: Window::default(),
                            outstanding: None,
                            backoff: 0,
                            last_burst_ns: 0,
                        })
                        .collect(),
                    volumes: Vec::new(),
                });
                Ok(Reply::VmCreated { vm: id })
            }
            // The simulated host has no configuration parser: its VMs come from `CreateVm`.
            Command::CreateVmConfig { .. } => Err(err(
                ErrorCode::Unsupported,
                "the simulated host creates VMs with CreateVm (module and parameters) only",
            )),
            Command::StartVm { vm } => self.transition(vm, &[VmState::Created], VmState::Running),
            Command::PauseVm { vm } => self.transition(vm, &[VmState::Running], VmState::Paused),
            Command::ResumeVm { vm } => {
                let r = self.transition(vm, &[VmState::Paused], VmState::Running)?;
                for c in &mut self.vm_mut(vm)?.vcpus {
                    for p in &mut c.pending {
                        if p.instruction == Instruction::AfterEvent(Event::Resumed) {
                            p.instruction = Instruction::Now;
                        }
                    }
                }
                Ok(r)
            }
            Command::DestroyVm { vm } => self.transition(
                vm,
                &[VmState::Created, VmState::Running, VmState::Paused],
                VmState::Destroyed,
            ),
            Command::SetSchedParams { vm, vcpu, params } => {
                let idx = usize::from(vcpu);
                if self.vm_mut(vm)?.vcpus.get(idx).is_none() {
                    return Err(err(
                        ErrorCode::NotFound,
                        &format!("VM {vm} has no vCPU {vcpu}"),
                    ));
                }
                self.check_params(&params, Some((vm, idx)))?;
                self.vm_mut(vm)?.vcpus[idx].params = params;
                Ok(Reply::Ack)
            }
            Command::SetVolumeCommitment {
                vm,
                volume,
                committed_iops,
                limit_iops,
            } => {
                let idx = usize::from(volume);
                if self.vm_mut(vm)?.volumes.get(idx).is_none() {
                    return Err(err(
                        ErrorCode::NotFound,
                        &format!("VM {vm} has no volume {volume}"),
                    ));
                }
                if limit_iops != 0 && limit_iops < committed_iops {
                    return Err(err(ErrorCode::Invalid, "limit below commitment"));
                }
                let others: u64 = self
                    .vms
                    .iter()
                    .filter(|v| v.state != VmState::Destroyed)
                    .flat_map(|v| v.volumes.iter().enumerate().map(move |(i, s)| (v.id, i, s)))
                    .filter(|(id, i, _)| !(*id == vm && *i == idx))
                    .map(|(_, _, s)| u64::from(s.committed_iops))
                    .sum();
                let committable =
                    u64::from(self.cfg.device_iops) * u64::from(self.cfg.committable_pct) / 100;
                if others + u64::from(committed_iops) > committable {
                    return Err(err(
                        ErrorCode::Admission,
                        &format!(
                            "committed {others} + {committed_iops} IOPS > committable {committable} ({}% of {})",
                            self.cfg.committable_pct, self.cfg.device_iops
                        ),
                    ));
                }
                let v = &mut self.vm_mut(vm)?.volumes[idx];
                v.committed_iops = committed_iops;
                v.limit_iops = limit_iops;
                Ok(Reply::Ack)
            }
            Command::ApplyGrant(g) => self.apply_grant(&g),
            Command::DenyCredit {
                credit_request_id, ..
            } => {
                self.totals.denials += 1;
                let backoff = self.cfg.deny_backoff_ticks;
                for c in self.vms.iter_mut().flat_map(|v| v.vcpus.iter_mut()) {
                    if c.outstanding.map(|o| o.0) == Some(credit_request_id) {
                        c.outstanding = None;
                        c.backoff = backoff;
                    }
                }
                Ok(Reply::Ack)
            }
            Command::ReadBalances { vm } => Ok(Reply::Balances(
                self.balances()
                    .filter(|b| vm.is_none_or(|f| f == b.vm))
                    .take(proto::MAX_VMS)
                    .collect(),
            )),
            Command::ReadBalancesFrom { vm, vcpu } => {
                Ok(proto::balance_page(self.balances(), vm, vcpu))
            }
            Command::SetTelemetryPeriod { period_ms } => {
                if period_ms == 0 {
                    return Err(err(
                        ErrorCode::Unsupported,
                        "the simulator always streams telemetry",
                    ));
                }
                let ticks = u64::from(period_ms) / self.cfg.tick_ms.max(1);
                self.telemetry_ticks = u32::try_from(ticks.max(1)).unwrap_or(u32::MAX);
                Ok(Reply::Ack)
            }
        }
    }

    /// Every vCPU's balance, VMs in id order.
    fn balances(&self) -> impl Iterator<Item = VcpuBalance> + '_ {
        self.vms.iter().flat_map(|v| {
            v.vcpus.iter().enumerate().map(move |(i, c)| VcpuBalance {
                vm: v.id,
                vcpu: u16::try_from(i).unwrap_or(u16::MAX),
                balance_ns: c.balance_ns,
                pending_ns: c.pending.iter().map(|p| p.remaining_ns).sum(),
                granted_total_ns: c.granted_total_ns,
            })
        })
    }

    fn transition(
        &mut self,
        vm: u32,
        from: &[VmState],
        to: VmState,
    ) -> Result<Reply, CommandError> {
        let v = self.vm_mut(vm)?;
        if !from.contains(&v.state) {
            return Err(err(
                ErrorCode::BadState,
                &format!("VM {vm} is {:?}; cannot become {to:?}", v.state),
            ));
        }
        v.state = to;
        Ok(Reply::Ack)
    }

    fn apply_grant(&mut self, g: &Grant) -> Result<Reply, CommandError> {
        if self.applied_grants.contains(&g.grant_id) {
            self.totals.duplicate_grants += 1;
            return Ok(Reply::GrantApplied {
                grant_id: g.grant_id,
                duplicate: true,
                applied_now_ns: 0,
                pending_ns: 0,
            });
        }
        let idx = usize::from(g.unit);
        let vm = g.vm;
        let c = match self.vm_mut(vm).map(|v| v.vcpus.get_mut(idx)) {
            Ok(Some(c)) if g.resource == Resource::Cpu => c,
            _ => {
                self.totals.refused_grants += 1;
                return Err(err(
                    ErrorCode::NotFound,
                    &format!("no vCPU {vm}/{idx} for grant {}", g.grant_id),
                ));
            }
        };
        let mut now = 0u64;
        let mut pending = 0u64;
        for s in &g.stages {
            match s.instruction {
                Instruction::Now => now += s.amount_ns,
                instruction => {
                    pending += s.amount_ns;
                    c.pending.push(PendingStage {
                        grant_id: g.grant_id,
                        remaining_ns: s.amount_ns,
                        instruction,
                        age_ticks: 0,
                    });
                }
            }
        }
        c.balance_ns = c.balance_ns.saturating_add(to_i64(now));
        c.window.granted_ns += now;
        let total = g.total_ns();
        c.granted_total_ns += total;
        if c.outstanding.map(|o| o.0) == Some(g.credit_request_id) {
            c.outstanding = None;
        }
        self.applied_grants.insert(g.grant_id);
        self.grant_log.push((g.grant_id, total));
        self.totals.grants += 1;
        self.totals.received_ns += total;
        self.totals.applied_ns += now;
        Ok(Reply::GrantApplied {
            grant_id: g.grant_id,
            duplicate: false,
            applied_now_ns: now,
            pending_ns: pending,
        })
    }

    /// Which grant ids have staged credits left (diagnostics).
    #[must_use]
    pub fn staged_grants(&self) -> Vec<u64> {
        self.vms
            .iter()
            .flat_map(|v| v.vcpus.iter())
            .flat_map(|c| c.pending.iter().map(|p| p.grant_id))
            .collect()
    }
}

/// Handle on a running simulator.
#[derive(Debug, Clone)]
pub struct SimHandle {
    /// Shared state (lock briefly).
    pub state: Arc<Mutex<SimState>>,
    /// Address the simulator listens on.
    pub address: Address,
}

impl SimHandle {
    /// Current report.
    ///
    /// # Panics
    /// If the state mutex was poisoned by a panic in the simulator.
    #[must_use]
    pub fn report(&self) -> SimReport {
        self.state.lock().expect("simhost state poisoned").report()
    }
}

/// Starts the simulator on `listen`: it ticks and serves one agent connection at a time (a new connection
/// replaces the old one).
///
/// # Errors
/// If the address cannot be bound.
pub async fn spawn(cfg: SimConfig, listen: &Address) -> std::io::Result<SimHandle> {
    let listener = Listener::bind(listen).await?;
    let address = listener.local()?;
    let tick = Duration::from_millis(cfg.tick_ms.max(1));
    let state = Arc::new(Mutex::new(SimState::new(cfg)));
    let ticker = state.clone();
    tokio::spawn(async move {
        let mut iv = tokio::time::interval(tick);
        iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        loop {
            iv.tick().await;
            if let Ok(mut s) = ticker.lock() {
                s.tick();
            }
        }
    });
    let mode = state
        .lock()
        .map(|s| Mode {
            whole_answers: s.cfg.whole_answers || s.cfg.old_host,
            old_host: s.cfg.old_host,
            version: s.cfg.protocol_version.unwrap_or(proto::PROTOCOL_VERSION),
        })
        .unwrap_or_default();
    let acc = state.clone();
    tokio::spawn(async move {
        let mut session = 0u32;
        loop {
            let Ok(stream) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            session = session.wrapping_add(1);
            let (tx, rx) = mpsc::unbounded_channel();
            let hello = {
                let Ok(mut s) = acc.lock() else { return };
                s.out = Some(tx);
                s.totals.connections += 1;
                s.hello()
            };
            let st = acc.clone();
            let seed = u32::try_from(now_ms().rem_euclid(1 << 30)).unwrap_or(0) ^ session;
            tokio::spawn(serve(stream, st, rx, hello, seed, mode));
        }
    });
    Ok(SimHandle { state, address })
}

/// How one simulated host talks (from its [`SimConfig`]).
#[derive(Debug, Clone, Copy, Default)]
struct Mode {
    /// Never send parts (`whole_answers`, or an old host).
    whole_answers: bool,
    /// A host from before parts, balance pages and `AgentHello`.
    old_host: bool,
    /// Version of its frames.
    version: u8,
}

impl Mode {
    /// What this host's decoder would refuse: every frame of another protocol version, and for an old host the
    /// commands appended after it was built.
    fn refuses(&self, cmd: &Command) -> bool {
        self.version != proto::PROTOCOL_VERSION
            || (self.old_host
                && matches!(
                    cmd,
                    Command::AgentHello { .. } | Command::ReadBalancesFrom { .. }
                ))
    }
}

async fn serve(
    stream: crate::link::BoxStream,
    state: Arc<Mutex<SimState>>,
    mut rx: mpsc::UnboundedReceiver<ToAgent>,
    hello: Hello,
    session: u32,
    mode: Mode,
) {
    use std::sync::atomic::{AtomicU32, Ordering};
    let (mut rd, mut wr) = tokio::io::split(stream);
    // What the agent on this connection reads (`AgentHello`); reset by `Attach`, as on the kernel.
    let agent_caps = Arc::new(AtomicU32::new(0));
    let reads = agent_caps.clone();
    let writer = tokio::spawn(async move {
        let mut enc = FrameEncoder::with_version(session, 1, mode.version);
        if let Ok(bytes) = enc.encode_vec(&ToAgent::Hello(hello)) {
            if wr.write_all(&bytes).await.is_err() {
                return;
            }
        }
        let mut scratch = vec![0u8; proto::MAX_PAYLOAD];
        while let Some(m) = rx.recv().await {
            // Long answers go in parts, as the kernel sends them (`proto::parts`).
            let mut bytes = Vec::new();
            match &m {
                ToAgent::Response(r)
                    if !mode.whole_answers
                        && reads.load(Ordering::Relaxed) & proto::caps::ANSWER_PARTS != 0 =>
                {
                    match proto::outgoing(r, &mut scratch) {
                        Ok(proto::Outgoing::Parts(parts)) => {
                            for p in parts {
                                if let Ok(b) = enc.encode_vec(&ToAgent::ResponsePart(p)) {
                                    bytes.extend(b);
                                }
                            }
                        }
                        Ok(proto::Outgoing::Whole) | Err(_) => {
                            bytes = enc.encode_vec(&m).unwrap_or_default();
                        }
                    }
                }
                _ => bytes = enc.encode_vec(&m).unwrap_or_default(),
            }
            if wr.write_all(&bytes).await.is_err() {
                return;
            }
        }
    });
    let mut dec = FrameDecoder::new();
    let mut buf = [0u8; 4096];
    let mut rejected_seen = 0;
    loop {
        let n = match rd.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let mut reqs = Vec::new();
        dec.push_slice::<ToHost>(&buf[..n], |f| {
            let ToHost::Request(r) = f.msg;
            reqs.push(r);
        });
        let Ok(mut s) = state.lock() else { break };
        let rej = dec.stats().rejected();
        s.totals.frames_rejected += rej - rejected_seen;
        rejected_seen = rej;
        for r in reqs {
            if mode.refuses(&r.command) {
                s.totals.frames_rejected += 1;
                continue;
            }
            match r.command {
                Command::Attach => agent_caps.store(0, Ordering::Relaxed),
                Command::AgentHello { capabilities } => {
                    agent_caps.store(capabilities, Ordering::Relaxed);
                }
                _ => {}
            }
            s.handle_request(r);
        }
    }
    writer.abort();
}

/// Runs the simulator until killed, writing `report` (JSON) every second when given.
///
/// # Errors
/// Bind errors.
pub async fn run(
    cfg: SimConfig,
    listen: &Address,
    report: Option<std::path::PathBuf>,
) -> std::io::Result<()> {
    let h = spawn(cfg, listen).await?;
    tracing::info!("simhost listening on {}", h.address);
    let mut iv = tokio::time::interval(Duration::from_secs(1));
    loop {
        iv.tick().await;
        if let Some(path) = &report {
            let r = h.report();
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, serde_json::to_vec_pretty(&r).unwrap_or_default())?;
            std::fs::rename(&tmp, path)?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::Stage;

    fn grant(id: u64, stages: &[(u64, Instruction)]) -> Request {
        Request {
            id: 100 + id,
            command: Command::ApplyGrant(Grant {
                grant_id: id,
                credit_request_id: 0,
                resource: Resource::Cpu,
                vm: 1,
                unit: 0,
                stages: stages
                    .iter()
                    .map(|&(amount_ns, instruction)| Stage {
                        amount_ns,
                        instruction,
                    })
                    .collect(),
            }),
        }
    }

    /// A grant id applies once whatever the request id; staged credits are released on schedule; the totals
    /// always balance (received = applied + pending).
    #[test]
    fn grants_apply_once_and_stages_release_on_schedule() {
        let mut cfg = SimConfig::demo("t", 10);
        cfg.migration_ticks = 3;
        for v in &mut cfg.vms {
            for c in &mut v.vcpus {
                c.demand_pct = 0;
                c.params.accrual_ns = 0;
                c.launch_balance_ns = 0;
            }
        }
        let mut s = SimState::new(cfg);
        s.handle_request(grant(
            1,
            &[
                (10, Instruction::Now),
                (9, Instruction::Rate { per_period_ns: 4 }),
            ],
        ));
        s.handle_request(grant(1, &[(10, Instruction::Now)]));
        let mut g2 = grant(1, &[(10, Instruction::Now)]);
        g2.id = 999;
        s.handle_request(g2);
        s.handle_request(grant(
            2,
            &[(5, Instruction::AfterEvent(Event::MigrationComplete))],
        ));
        let bal = |s: &SimState| {
            s.report()
                .vcpus
                .iter()
                .find(|v| v.vm == 1)
                .unwrap()
                .balance_ns
        };
        assert_eq!(bal(&s), 10);
        assert_eq!(
            s.report().totals.duplicate_grants,
            1,
            "same grant id under a new request id"
        );
        assert_eq!(s.report().totals.duplicate_requests, 1, "same request id");
        let mut seen = Vec::new();
        for _ in 0..4 {
            s.tick();
            let r = s.report();
            assert_eq!(
                r.totals.received_ns,
                r.totals.applied_ns + r.totals.pending_ns
            );
            seen.push(bal(&s));
        }
        // Rate 4/period: 14, 18, then 19 + the migration stage (5) at tick 3 = 24.
        assert_eq!(seen, vec![14, 18, 24, 24]);
        assert_eq!(s.report().totals.received_ns, 24);
    }

    #[test]
    fn admission_refuses_with_numbers() {
        let mut cfg = SimConfig::demo("t", 10);
        cfg.cpus = 1;
        let mut s = SimState::new(cfg);
        let (tx, mut rx) = mpsc::unbounded_channel();
        s.out = Some(tx);
        s.handle_request(Request {
            id: 1,
            command: Command::SetVolumeCommitment {
                vm: 1,
                volume: 0,
                committed_iops: 5000,
                limit_iops: 0,
            },
        });
        s.handle_request(Request {
            id: 2,
            command: Command::PauseVm { vm: 42 },
        });
        let params = SchedParams {
            budget_ns: 900_000,
            period_ns: 1_000_000,
            ..s.cfg.vms[0].vcpus[0].params
        };
        s.handle_request(Request {
            id: 3,
            command: Command::SetSchedParams {
                vm: 1,
                vcpu: 0,
                params,
            },
        });
        let mut answers = Vec::new();
        while let Ok(ToAgent::Response(r)) = rx.try_recv() {
            answers.push(r.result.unwrap_err());
        }
        assert_eq!(answers.len(), 3);
        assert_eq!(answers[0].code, ErrorCode::Admission);
        // Demo volumes commit 350 + 500 + 200; without this one's 350 the others hold 700.
        assert_eq!(
            answers[0].reason.as_str(),
            "committed 700 + 5000 IOPS > committable 1600 (80% of 2000)"
        );
        assert_eq!(answers[1].code, ErrorCode::NotFound);
        assert_eq!(answers[2].code, ErrorCode::Admission);
        // Baselines: 20 % + 2 x 20 % + 10 % = 70 %; replacing this vCPU's 20 % by 90 % needs 140 % of 1 CPU.
        assert_eq!(
            answers[2].reason.as_str(),
            "baseline utilisation 500000+900000 ppm exceeds 1000000 ppm of 1 CPUs"
        );
    }
}
