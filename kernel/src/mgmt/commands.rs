//! Command execution of the management endpoint: queries (list, describe, balances) and state changes (create
//! from a `vms.conf` section, pause, resume, destroy (stop and reclaim), scheduling parameters, grants, denials,
//! telemetry period).
//!
//! Design: queries build a [`Reply`] from the runtime and the scheduler; state-changing commands return a small
//! [`Cached`] answer, which is what the dedup window keeps (a duplicate request gets exactly the answer the first
//! execution produced, without the bulk of a full `Reply`). Every change goes through the scheduler's own checks
//! (admission for parameters, grant-id memory for grants); refusals carry the scheduler's reason and numbers.
//!
//! Invariants: a VM's id on the channel is its index in the runtime's VM table, a vCPU's unit its index within
//! the VM; a command that fails changes nothing (grants are validated completely before any stage applies).

use core::sync::atomic::Ordering;

use proto::{
    BurstMode as WireBurst, Command, CommandError, ErrorCode, Event, Grant, Instruction, Reply,
    SchedParams as WireParams, VcpuBalance, VmId, VmInfo, VmState as WireState, VmSummary,
    VolumeInfo, MAX_STAGES,
};
use sched::cpu::pool::{Grant as SchedGrant, GrantOutcome, GrantSchedule};
use sched::cpu::{BurstMode, SchedError, VcpuConfig};
use virt::{StopCause, StopReport};

use super::Endpoint;
use crate::arch::x86_64::{lapic, percpu};
use crate::cmdline::MGMT_TELEMETRY_MS_RANGE;
use crate::vm::{runloop, Runtime, Vm};

/// Overdraft given to a vCPU switched to `unlimited` over the channel that was `standard` before.
pub const DEFAULT_OVERDRAFT_NS: u64 = 100_000_000;
/// Scheduler event ids of grant stages held for an event: `(vm + 1) << 8 | kind`.
const EVENT_RESUMED: u64 = 1;
/// See [`EVENT_RESUMED`]; migration does not exist on this host, so such stages stay staged.
const EVENT_MIGRATION_COMPLETE: u64 = 2;

/// The answer of a state-changing command, as kept by the dedup window.
#[derive(Clone, Debug)]
pub enum Cached {
    Ack,
    Created {
        vm: VmId,
    },
    Grant {
        grant_id: u64,
        duplicate: bool,
        applied_now_ns: u64,
        pending_ns: u64,
    },
    Err(CommandError),
}

impl Cached {
    /// The wire result.
    pub fn result(&self) -> Result<Reply, CommandError> {
        match *self {
            Self::Ack => Ok(Reply::Ack),
            Self::Created { vm } => Ok(Reply::VmCreated { vm }),
            Self::Grant {
                grant_id,
                duplicate,
                applied_now_ns,
                pending_ns,
            } => Ok(Reply::GrantApplied {
                grant_id,
                duplicate,
                applied_now_ns,
                pending_ns,
            }),
            Self::Err(ref e) => Err(e.clone()),
        }
    }
}

fn err(code: ErrorCode, args: core::fmt::Arguments<'_>) -> CommandError {
    let mut s: heapless::String<192> = heapless::String::new();
    // A reason longer than the buffer is cut (and then truncated to the wire's bound).
    let _ = core::fmt::write(&mut Cut(&mut s), args);
    CommandError::new(code, &s)
}

/// A `fmt::Write` that keeps what fits.
struct Cut<'a, const N: usize>(&'a mut heapless::String<N>);

impl<const N: usize> core::fmt::Write for Cut<'_, N> {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        for ch in s.chars() {
            if self.0.push(ch).is_err() {
                break;
            }
        }
        Ok(())
    }
}

fn vm_of(rt: &Runtime, vm: VmId) -> Result<(usize, &Vm), CommandError> {
    usize::try_from(vm)
        .ok()
        .and_then(|i| rt.vms.get(i).map(|v| (i, v)))
        .ok_or_else(|| {
            err(
                ErrorCode::NotFound,
                format_args!("no VM {vm} (this host has {})", rt.vms.len()),
            )
        })
}

/// Slot index of vCPU `unit` of VM `vm`.
fn slot_of(rt: &Runtime, vm: VmId, unit: u16) -> Result<usize, CommandError> {
    let (_, v) = vm_of(rt, vm)?;
    let s = v.slots.start + usize::from(unit);
    if s >= v.slots.end {
        return Err(err(
            ErrorCode::NotFound,
            format_args!("VM {vm} has no vCPU {unit} ({} vCPUs)", v.slots.len()),
        ));
    }
    Ok(s)
}

fn wire_state(v: &Vm) -> WireState {
    if v.stopped() {
        WireState::Destroyed
    } else if v.paused() {
        WireState::Paused
    } else {
        WireState::Running
    }
}

fn wire_params(cfg: &VcpuConfig) -> WireParams {
    WireParams {
        budget_ns: cfg.budget_ns,
        period_ns: cfg.period_ns,
        accrual_ns: cfg.accrual_ns,
        cap_ns: cfg.balance_cap_ns,
        burst: match cfg.burst_mode {
            BurstMode::Standard => WireBurst::Standard,
            BurstMode::Unlimited { .. } => WireBurst::Unlimited,
        },
        weight: u16::try_from(cfg.weight).unwrap_or(u16::MAX),
    }
}

fn sched_error(e: SchedError) -> CommandError {
    let code = match e {
        SchedError::Admission(_) | SchedError::Placement(_) => ErrorCode::Admission,
        SchedError::Config(_) => ErrorCode::Invalid,
        SchedError::NoSuchCpu(_) | SchedError::NoSuchVcpu(_) => ErrorCode::NotFound,
        SchedError::NotRunning(_) | SchedError::TooManyVcpus => ErrorCode::BadState,
    };
    err(code, format_args!("{e}"))
}

fn event_id(vm: usize, event: Event) -> u64 {
    let kind = match event {
        Event::Resumed => EVENT_RESUMED,
        Event::MigrationComplete => EVENT_MIGRATION_COMPLETE,
    };
    (u64::try_from(vm).unwrap_or(u64::MAX >> 9) + 1) << 8 | kind
}

/// Changes a volume's commitment through the I/O service's admission control. The channel carries only the
/// commitment and the limit; the volume's weight, burst bucket and overage policy in force are kept (read from the
/// I/O service first; the only other writer, the `iops_change` test hook, changes the same two fields).
fn set_commitment(
    rt: &Runtime,
    vm: VmId,
    volume: u16,
    committed_iops: u32,
    limit_iops: u32,
) -> Result<(), CommandError> {
    let (_, v) = vm_of(rt, vm)?;
    if v.stopped() {
        return Err(err(ErrorCode::BadState, format_args!("VM {vm} is stopped")));
    }
    let io_error = |e: crate::io::service::IoError| {
        use crate::io::service::IoError;
        match e {
            // The partitioner's numbers alone: the wire's reason has room for 96 characters.
            IoError::Refused(_) => err(ErrorCode::Admission, format_args!("{e}")),
            IoError::NoService | IoError::UnknownVolume { .. } => err(
                ErrorCode::NotFound,
                format_args!("VM {vm} volume {volume}: {e}"),
            ),
            IoError::Detached => err(
                ErrorCode::BadState,
                format_args!("VM {vm} volume {volume}: {e}"),
            ),
        }
    };
    let in_force =
        crate::io::service::config_in_force(&v.name, usize::from(volume)).map_err(io_error)?;
    let cfg = sched::iops::VolumeConfig {
        committed_iops: u64::from(committed_iops),
        limit_iops: (limit_iops > 0).then_some(u64::from(limit_iops)),
        ..in_force
    };
    crate::io::service::set_commitment(&v.name, usize::from(volume), cfg).map_err(io_error)
}

/// The runtime's VMs in id order, as list entries.
fn summaries(rt: &Runtime) -> impl Iterator<Item = VmSummary> + '_ {
    rt.vms.iter().enumerate().map(|(i, v)| VmSummary {
        vm: u32::try_from(i).unwrap_or(u32::MAX),
        name: proto::truncated(&v.name),
        state: wire_state(v),
        vcpus: u16::try_from(v.slots.len()).unwrap_or(u16::MAX),
    })
}

/// Wakes the CPUs running `vm`'s vCPUs out of an idle halt, so a resume takes effect at once.
fn kick(rt: &Runtime, vm: &Vm) {
    let me = percpu::current_id();
    for s in vm.slots.clone() {
        let cpu = rt.slots[s].cpu;
        if cpu == me {
            continue;
        }
        if let Some(p) = usize::try_from(cpu).ok().and_then(percpu::get) {
            lapic::send_fixed(p.apic_id.load(Ordering::Relaxed), lapic::IPI_VECTOR);
        }
    }
}

impl Endpoint {
    /// Runs a query (never changes state).
    pub(super) fn execute_query(
        &mut self,
        rt: &Runtime,
        cmd: &Command,
    ) -> Result<Reply, CommandError> {
        match *cmd {
            Command::Attach => Ok(Reply::Ack),
            Command::AgentHello { capabilities } => {
                self.agent_caps = capabilities;
                Ok(Reply::Ack)
            }
            Command::ListVms => {
                // The first page only (the whole table takes `ListVmsFrom`).
                let mut list = heapless::Vec::new();
                for s in summaries(rt).take(proto::MAX_VMS) {
                    // Capacity is MAX_VMS.
                    let _ = list.push(s);
                }
                Ok(Reply::VmList(list))
            }
            Command::ListVmsFrom { first } => Ok(proto::vm_page(summaries(rt), first)),
            Command::DescribeVm { vm } => {
                let (_, v) = vm_of(rt, vm)?;
                let mut vcpus = heapless::Vec::new();
                {
                    let sched = rt.sched.lock();
                    for s in v.slots.clone().take(proto::MAX_VCPUS) {
                        let cfg = sched.config(rt.slots[s].id).map_err(sched_error)?;
                        let _ = vcpus.push(wire_params(&cfg));
                    }
                }
                Ok(Reply::VmInfo(VmInfo {
                    summary: VmSummary {
                        vm,
                        name: proto::truncated(&v.name),
                        state: wire_state(v),
                        vcpus: u16::try_from(v.slots.len()).unwrap_or(u16::MAX),
                    },
                    module: proto::truncated(&v.image),
                    vcpus,
                    volumes: crate::io::service::volume_stats()
                        .iter()
                        .filter(|s| s.vm == v.name && s.attached)
                        .take(proto::MAX_VOLUMES)
                        .map(|s| VolumeInfo {
                            volume: u16::try_from(s.index).unwrap_or(u16::MAX),
                            committed_iops: u32::try_from(s.committed_iops).unwrap_or(u32::MAX),
                            limit_iops: s
                                .limit_iops
                                .map_or(0, |l| u32::try_from(l).unwrap_or(u32::MAX)),
                        })
                        .collect(),
                }))
            }
            Command::ReadBalances { vm } => {
                let out: heapless::Vec<VcpuBalance, { proto::MAX_VMS }> = self
                    .balances(rt)
                    .into_iter()
                    .filter(|b| vm.is_none_or(|want| want == b.vm))
                    .take(proto::MAX_VMS)
                    .collect();
                if let Some(want) = vm {
                    if out.is_empty() {
                        vm_of(rt, want)?;
                    }
                }
                Ok(Reply::Balances(out))
            }
            Command::ReadBalancesFrom { vm, vcpu } => {
                Ok(proto::balance_page(self.balances(rt), vm, vcpu))
            }
            _ => Err(err(
                ErrorCode::Invalid,
                format_args!("not a query: {cmd:?}"),
            )),
        }
    }

    /// Every vCPU's balance, in slot order (VMs in creation order, vCPUs in index order).
    fn balances(&self, rt: &Runtime) -> alloc::vec::Vec<VcpuBalance> {
        let sched = rt.sched.lock();
        rt.slots
            .iter()
            .enumerate()
            .filter_map(|(s, slot)| {
                let st = sched.status(slot.id).ok()?;
                Some(VcpuBalance {
                    vm: u32::try_from(slot.vm).unwrap_or(u32::MAX),
                    vcpu: u16::try_from(slot.index).unwrap_or(u16::MAX),
                    balance_ns: st.balance_ns,
                    pending_ns: st.staged_grant_ns,
                    granted_total_ns: self.granted_total.get(s).copied().unwrap_or(0),
                })
            })
            .collect()
    }

    /// Runs a state-changing command (the caller deduplicates by request id).
    pub(super) fn execute_change(&mut self, rt: &Runtime, cmd: &Command, now: u64) -> Cached {
        let r = match cmd {
            Command::CreateVm { .. } => Err(err(
                ErrorCode::Unsupported,
                format_args!("this host creates VMs from a vms.conf section: CreateVmConfig"),
            )),
            Command::CreateVmConfig { config } => return self.create(rt, config),
            Command::StartVm { vm } => vm_of(rt, *vm).and_then(|(_, v)| {
                Err(if v.stopped() {
                    err(
                        ErrorCode::BadState,
                        format_args!("VM {vm} was stopped; it cannot start again"),
                    )
                } else {
                    err(
                        ErrorCode::BadState,
                        format_args!("VM {vm} already started at boot"),
                    )
                })
            }),
            Command::PauseVm { vm } => self.pause(rt, *vm, true, now),
            Command::ResumeVm { vm } => self.pause(rt, *vm, false, now),
            Command::DestroyVm { vm } => self.destroy(rt, *vm, now),
            Command::SetSchedParams { vm, vcpu, params } => {
                self.set_params(rt, *vm, *vcpu, params, now)
            }
            Command::SetVolumeCommitment {
                vm,
                volume,
                committed_iops,
                limit_iops,
            } => set_commitment(rt, *vm, *volume, *committed_iops, *limit_iops),
            Command::ApplyGrant(g) => return self.apply_grant(rt, g, now),
            Command::DenyCredit {
                credit_request_id,
                reason,
            } => {
                if let Some(pos) = self
                    .outstanding
                    .iter()
                    .position(|o| o.request.request_id == *credit_request_id)
                {
                    let o = self.outstanding.remove(pos);
                    rt.sched
                        .lock()
                        .request_declined(rt.slots[o.slot].id, *credit_request_id);
                    log::info!(
                        "mgmt: credit request {credit_request_id} denied: {}",
                        reason.as_str()
                    );
                }
                Ok(())
            }
            Command::SetTelemetryPeriod { period_ms } => {
                if *period_ms != 0 && !MGMT_TELEMETRY_MS_RANGE.contains(period_ms) {
                    Err(err(
                        ErrorCode::Invalid,
                        format_args!(
                            "telemetry period {period_ms} ms: 0 (off) or {}..={} ms",
                            MGMT_TELEMETRY_MS_RANGE.start(),
                            MGMT_TELEMETRY_MS_RANGE.end()
                        ),
                    ))
                } else {
                    self.telemetry_period_ns = u64::from(*period_ms) * 1_000_000;
                    self.next_telemetry = rt.after(now, self.telemetry_period_ns);
                    Ok(())
                }
            }
            Command::Attach
            | Command::ListVms
            | Command::ListVmsFrom { .. }
            | Command::DescribeVm { .. }
            | Command::ReadBalances { .. }
            | Command::ReadBalancesFrom { .. }
            | Command::AgentHello { .. } => Err(err(
                ErrorCode::Invalid,
                format_args!("not a state change: {cmd:?}"),
            )),
        };
        match r {
            Ok(()) => Cached::Ack,
            Err(e) => Cached::Err(e),
        }
    }

    /// Creates and starts a VM from one `[vm ...]` section (`virt::config`); the new VM's id is its index in the
    /// runtime's table. Refusals change nothing: a parse error names the line and field, admission its numbers.
    fn create(&mut self, rt: &Runtime, text: &str) -> Cached {
        let configs = match virt::config::parse(text) {
            Ok(c) => c,
            Err(e) => return Cached::Err(err(ErrorCode::Invalid, format_args!("{e}"))),
        };
        let [cfg] = configs.as_slice() else {
            return Cached::Err(err(
                ErrorCode::Invalid,
                format_args!("one [vm ...] section expected, {} given", configs.len()),
            ));
        };
        match crate::vm::setup::create_vm(rt, cfg) {
            Ok(index) => {
                self.sync_tables(rt);
                let v = &rt.vms[index];
                // The CPUs of its vCPUs, comma separated (16 vCPUs of up to 3 digits fit).
                let mut cpus: heapless::String<64> = heapless::String::new();
                for (i, s) in v.slots.clone().enumerate() {
                    let sep = if i == 0 { "" } else { "," };
                    let _ = core::fmt::write(
                        &mut Cut(&mut cpus),
                        format_args!("{sep}{}", rt.slots[s].cpu),
                    );
                }
                crate::marker!(
                    "VMCREATED name={} vm={index} image={} memory_mb={} vcpus={} cpus={}",
                    v.name,
                    v.image,
                    cfg.memory_bytes >> 20,
                    v.slots.len(),
                    cpus
                );
                kick(rt, v);
                Cached::Created {
                    vm: u32::try_from(index).unwrap_or(u32::MAX),
                }
            }
            Err(e) => {
                use crate::vm::setup::BuildError;
                log::warn!("mgmt: VM '{}' not created: {e}", cfg.name);
                let code = match e {
                    BuildError::NoModule(_) => ErrorCode::NotFound,
                    BuildError::Admission(_) | BuildError::NoMemory(_) => ErrorCode::Admission,
                    BuildError::Failed(_) => ErrorCode::Invalid,
                };
                Cached::Err(err(code, format_args!("{e}")))
            }
        }
    }

    fn pause(&mut self, rt: &Runtime, vm: VmId, pause: bool, now: u64) -> Result<(), CommandError> {
        let (index, v) = vm_of(rt, vm)?;
        if v.stopped() {
            return Err(err(ErrorCode::BadState, format_args!("VM {vm} is stopped")));
        }
        let was = v.paused.swap(pause, Ordering::AcqRel);
        if was == pause {
            return Ok(());
        }
        if pause {
            log::info!("mgmt: VM {} paused", v.name);
        } else {
            let released = rt
                .sched
                .lock()
                .signal_event(event_id(index, Event::Resumed), rt.ns(now));
            log::info!(
                "mgmt: VM {} resumed ({released} credit-ns of grants held for the resume applied)",
                v.name
            );
            kick(rt, v);
        }
        Ok(())
    }

    fn destroy(&mut self, rt: &Runtime, vm: VmId, now: u64) -> Result<(), CommandError> {
        let (index, v) = vm_of(rt, vm)?;
        if v.stopped() {
            return Ok(());
        }
        // Stop, then hand the VM's memory back (this CPU's vCPUs now, the others' at their next iteration: the
        // kick below wakes idle ones).
        let status = runloop::stop_and_reclaim(
            rt,
            index,
            StopReport {
                cause: StopCause::HostFailure {
                    detail: "destroyed by the management agent",
                },
                rip: v.entry,
                addr: None,
            },
            now,
        );
        log::info!("mgmt: VM {} destroyed; memory reclaim {status:?}", v.name);
        v.paused.store(false, Ordering::Release);
        kick(rt, v);
        self.outstanding.retain(|o| rt.slots[o.slot].vm != index);
        Ok(())
    }

    fn set_params(
        &mut self,
        rt: &Runtime,
        vm: VmId,
        vcpu: u16,
        p: &WireParams,
        now: u64,
    ) -> Result<(), CommandError> {
        let s = slot_of(rt, vm, vcpu)?;
        if rt.vms[rt.slots[s].vm].stopped() {
            return Err(err(ErrorCode::BadState, format_args!("VM {vm} is stopped")));
        }
        let id = rt.slots[s].id;
        let mut sched = rt.sched.lock();
        let mut cfg = sched.config(id).map_err(sched_error)?;
        cfg.budget_ns = p.budget_ns;
        cfg.period_ns = p.period_ns;
        cfg.accrual_ns = p.accrual_ns;
        cfg.balance_cap_ns = p.cap_ns;
        cfg.weight = u32::from(p.weight);
        cfg.burst_mode = match (p.burst, cfg.burst_mode) {
            (WireBurst::Standard, _) => BurstMode::Standard,
            (WireBurst::Unlimited, keep @ BurstMode::Unlimited { .. }) => keep,
            (WireBurst::Unlimited, BurstMode::Standard) => BurstMode::Unlimited {
                overdraft_limit_ns: DEFAULT_OVERDRAFT_NS,
            },
        };
        cfg.launch_balance_ns = cfg.launch_balance_ns.min(cfg.balance_cap_ns);
        sched.reconfigure(id, cfg, rt.ns(now)).map_err(sched_error)
    }

    /// Applies a grant completely or not at all, once per grant id.
    fn apply_grant(&mut self, rt: &Runtime, g: &Grant, now: u64) -> Cached {
        match self.try_grant(rt, g, now) {
            Ok(c) => c,
            Err(e) => Cached::Err(e),
        }
    }

    fn try_grant(&mut self, rt: &Runtime, g: &Grant, now: u64) -> Result<Cached, CommandError> {
        if g.resource == proto::Resource::Io {
            return self.try_io_grant(rt, g);
        }
        let s = slot_of(rt, g.vm, g.unit)?;
        let vm_index = rt.slots[s].vm;
        if rt.vms[vm_index].stopped() {
            return Err(err(
                ErrorCode::NotFound,
                format_args!("grant {}: VM {} is stopped", g.grant_id, g.vm),
            ));
        }
        if g.stages.is_empty() || g.total_ns() == 0 {
            return Err(err(
                ErrorCode::Invalid,
                format_args!("grant {} carries no credits", g.grant_id),
            ));
        }
        let stages = u64::try_from(MAX_STAGES).unwrap_or(u64::MAX);
        let base = g.grant_id.checked_mul(stages).ok_or_else(|| {
            err(
                ErrorCode::Invalid,
                format_args!("grant id {} out of range", g.grant_id),
            )
        })?;
        let mut schedules: heapless::Vec<(u64, GrantSchedule), MAX_STAGES> = heapless::Vec::new();
        for st in &g.stages {
            let schedule = match st.instruction {
                Instruction::Now => GrantSchedule::Now,
                Instruction::Rate { per_period_ns: 0 } => {
                    return Err(err(
                        ErrorCode::Invalid,
                        format_args!("grant {}: a rate stage of 0 never ends", g.grant_id),
                    ))
                }
                Instruction::Rate { per_period_ns } => GrantSchedule::PerPeriod { per_period_ns },
                Instruction::AfterEvent(e) => GrantSchedule::AfterEvent {
                    event: event_id(vm_index, e),
                },
            };
            if st.amount_ns > 0 {
                // Capacity equals the wire's stage bound.
                let _ = schedules.push((st.amount_ns, schedule));
            }
        }
        let id = rt.slots[s].id;
        let t = rt.ns(now);
        let mut sched = rt.sched.lock();
        let (mut applied_now, mut pending) = (0u64, 0u64);
        for (i, &(amount, schedule)) in (0u64..).zip(schedules.iter()) {
            let grant = SchedGrant {
                grant_id: base + i,
                vcpu: id,
                credits_ns: amount,
                schedule,
                request_id: (i == 0 && g.credit_request_id != 0).then_some(g.credit_request_id),
            };
            match sched.apply_grant(grant, t) {
                Ok(GrantOutcome::Applied) => applied_now += amount,
                Ok(GrantOutcome::Staged) => pending += amount,
                // The first stage decides: all stages of a grant were applied together before.
                Ok(GrantOutcome::Duplicate) if i == 0 => {
                    drop(sched);
                    self.counters.grant_duplicates += 1;
                    return Ok(Cached::Grant {
                        grant_id: g.grant_id,
                        duplicate: true,
                        applied_now_ns: 0,
                        pending_ns: 0,
                    });
                }
                Ok(GrantOutcome::Duplicate) => {
                    log::error!(
                        "mgmt: grant {} stage {i}: id {} already used by another grant",
                        g.grant_id,
                        base + i
                    );
                }
                Err(e) => {
                    // Validated above, so only the first stage can be refused (an id older than the scheduler's
                    // grant-id window), and nothing was applied then.
                    return Err(err(
                        ErrorCode::Invalid,
                        format_args!("grant {}: {e}", g.grant_id),
                    ));
                }
            }
        }
        drop(sched);
        let total = applied_now + pending;
        self.granted_total[s] = self.granted_total[s].saturating_add(total);
        self.counters.grants += 1;
        self.counters.granted_ns = self.counters.granted_ns.saturating_add(total);
        self.counters.applied_now_ns = self.counters.applied_now_ns.saturating_add(applied_now);
        if g.credit_request_id != 0 {
            self.outstanding
                .retain(|o| o.request.request_id != g.credit_request_id);
        }
        Ok(Cached::Grant {
            grant_id: g.grant_id,
            duplicate: false,
            applied_now_ns: applied_now,
            pending_ns: pending,
        })
    }

    /// An I/O credit grant: `unit` is the volume index, the stage amounts are I/O credits (unit I/Os above the
    /// commitment). Every stage applies at once (the burst bucket has no periods to spread a rate over; the credits
    /// wait in the bucket until spent anyway); a stage held for an event is refused (nothing applied), since no
    /// event of this host concerns a volume. The I/O service applies it once per grant id.
    fn try_io_grant(&mut self, rt: &Runtime, g: &Grant) -> Result<Cached, CommandError> {
        let (_, v) = vm_of(rt, g.vm)?;
        if v.stopped() {
            return Err(err(
                ErrorCode::NotFound,
                format_args!("grant {}: VM {} is stopped", g.grant_id, g.vm),
            ));
        }
        if g.stages
            .iter()
            .any(|st| matches!(st.instruction, Instruction::AfterEvent(_)))
        {
            return Err(err(
                ErrorCode::Unsupported,
                format_args!("grant {}: I/O credits cannot wait for an event", g.grant_id),
            ));
        }
        let ios = g.total_ns();
        if ios == 0 {
            return Err(err(
                ErrorCode::Invalid,
                format_args!("grant {} carries no credits", g.grant_id),
            ));
        }
        let applied = crate::io::service::grant_io(&v.name, usize::from(g.unit), g.grant_id, ios)
            .map_err(|e| {
            use crate::io::service::IoError;
            let code = match e {
                IoError::Refused(_) => ErrorCode::Invalid,
                IoError::NoService | IoError::UnknownVolume { .. } => ErrorCode::NotFound,
                IoError::Detached => ErrorCode::BadState,
            };
            err(
                code,
                format_args!("grant {}: volume {}: {e}", g.grant_id, g.unit),
            )
        })?;
        if applied.duplicate {
            self.counters.grant_duplicates += 1;
        } else {
            self.counters.grants += 1;
        }
        Ok(Cached::Grant {
            grant_id: g.grant_id,
            duplicate: applied.duplicate,
            applied_now_ns: if applied.duplicate { 0 } else { ios },
            pending_ns: 0,
        })
    }

    /// Sends the I/O service's credit requests (volumes with an empty burst bucket and demand above their commitment,
    /// at most one per volume per window: the next window's request is the retry, so none is kept outstanding).
    pub(super) fn io_credit_requests(&mut self) {
        for n in crate::io::service::credit_needs() {
            self.counters.credit_requests += 1;
            self.send(&proto::ToAgent::CreditRequest(proto::CreditRequest {
                request_id: n.request_id,
                resource: proto::Resource::Io,
                vm: u32::try_from(n.vm).unwrap_or(u32::MAX),
                unit: u16::try_from(n.index).unwrap_or(u16::MAX),
                amount_ns: n.ios,
                balance_ns: i64::try_from(n.balance_ios).unwrap_or(i64::MAX),
            }));
        }
    }
}
