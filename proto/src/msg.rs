//! Message catalogue of the management channel, version [`PROTOCOL_VERSION`].
//!
//! Design: two enums, one per direction ([`ToAgent`]: hypervisor -> agent, [`ToHost`]: agent -> hypervisor),
//! encoded with postcard. Every collection and string is a `heapless` type with a fixed bound, so the largest
//! possible message is known statically and fits [`crate::MAX_PAYLOAD`] (checked by a test); the kernel needs no
//! allocator to send or receive any of them.
//!
//! Invariants:
//! - Units: CPU time and credits are credit-nanoseconds (`u64`/`i64`; one user-visible credit = one vCPU at 100%
//!   for one minute = [`CREDIT_NS`]); rates are per second; latencies are nanoseconds.
//! - Every agent -> host [`Request`] carries a request id; state-changing commands are idempotent by that id
//!   (the host keeps a [`crate::DedupWindow`] of recent ids and replays the cached [`Response`]). Credit grants
//!   additionally carry a grant id that the host applies at most once, whatever the request id.
//! - Variants are only ever appended; changing the meaning of a field bumps [`PROTOCOL_VERSION`]. What a peer
//!   may send beyond the first catalogue is negotiated with [`caps`] (see the crate docs, "Compatibility").

use heapless::{String, Vec};
use serde::{Deserialize, Serialize};

/// Version byte carried in every frame header. A frame with another version is dropped and counted.
pub const PROTOCOL_VERSION: u8 = 1;
/// One user-visible credit: one vCPU at 100% for one minute, in nanoseconds.
pub const CREDIT_NS: u64 = 60_000_000_000;
/// Maximum vCPUs described per VM in one message.
pub const MAX_VCPUS: usize = 16;
/// Maximum volumes described per VM in one message.
pub const MAX_VOLUMES: usize = 4;
/// Maximum VMs in one list reply: the size of a [`Reply::VmPage`] (and of the first-page-only
/// [`Reply::VmList`]). A host holds more (the kernel's VM table has room for [`MAX_HOST_VMS`]); the agent reads
/// them page by page with [`Command::ListVmsFrom`].
pub const MAX_VMS: usize = 32;
/// Most VMs one host holds (the kernel's VM table): a complete listing takes `MAX_HOST_VMS / MAX_VMS` pages.
pub const MAX_HOST_VMS: usize = 64;
/// Maximum stages in a staged grant.
pub const MAX_STAGES: usize = 4;
/// Most bytes of VM configuration text carried by [`Command::CreateVmConfig`].
pub const MAX_CONFIG_TEXT: usize = 1024;

/// Short identifier (host id, VM name, module name).
pub type Name = String<32>;
/// Human-readable reason attached to an error (admission numbers, etc.).
pub type Reason = String<96>;

/// Host-local VM identifier.
pub type VmId = u32;

/// Capability bits announced in [`Hello`].
pub mod caps {
    /// The host streams telemetry snapshots.
    pub const TELEMETRY: u32 = 1 << 0;
    /// The host sends credit requests for `unlimited` vCPUs.
    pub const CREDIT_REQUESTS: u32 = 1 << 1;
    /// The host partitions NVMe IOPS and accepts volume commitments.
    pub const IOPS: u32 = 1 << 2;
    /// The host can create VMs from loaded modules.
    pub const CREATE_VM: u32 = 1 << 3;
    /// Long answers as [`crate::ResponsePart`]s. From a host: it can send them (and does so only to an agent
    /// that announced this bit in [`super::Command::AgentHello`]). From an agent: it reads them.
    pub const ANSWER_PARTS: u32 = 1 << 4;
    /// The host answers [`super::Command::ReadBalancesFrom`] with [`super::Reply::BalancePage`]s; a host
    /// without this bit drops that command as a malformed frame, so the agent reads balances VM by VM.
    pub const BALANCE_PAGES: u32 = 1 << 5;
}

/// Hypervisor -> agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToAgent {
    /// Sent when the channel comes up, and as the reply to [`Command::Attach`].
    Hello(Hello),
    /// One telemetry snapshot for one VM.
    Telemetry(VmTelemetry),
    /// An `unlimited` vCPU (or volume) asks for pool credits.
    CreditRequest(CreditRequest),
    /// Answer to an agent [`Request`].
    Response(Response),
    /// The host's side of the link (its decoder's rejections, overruns, dedup answers), sent with every
    /// telemetry round so the agent sees faults in both directions.
    LinkStats(LinkStats),
    /// A VM has stopped for good (destroyed over the channel, or stopped by its own fault): sent once, after the
    /// VM's last [`VmTelemetry`] snapshot (its final window); no later snapshot names the VM.
    VmDestroyed(VmDestroyed),
    /// One part of a long [`Response`] (see [`crate::parts`]); the agent answers the request once it holds
    /// every part of one digest.
    ResponsePart(crate::parts::ResponsePart),
}

/// The end of a VM's telemetry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmDestroyed {
    /// The VM (its id is not reused by this boot of the host).
    pub vm: VmId,
    /// Sequence number of the VM's last snapshot (shares [`VmTelemetry::seq`]'s counter).
    pub last_seq: u64,
    /// Host monotonic time it was reported.
    pub time_ns: u64,
}

/// Counters of the host's end of the link since it came up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct LinkStats {
    /// The host decoder's counters (frames from the agent).
    pub decode: crate::frame::DecodeStats,
    /// Received bytes lost to receiver overruns.
    pub rx_overruns: u64,
    /// Frames to the agent dropped because the host's output queue was full.
    pub tx_dropped: u64,
    /// State-changing requests executed.
    pub executed: u64,
    /// Requests answered from the dedup window without running again.
    pub duplicates: u64,
    /// Requests refused as older than the dedup window (not executed).
    pub stale: u64,
}

/// Agent -> hypervisor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToHost {
    /// A command with its request id.
    Request(Request),
}

/// Host identity and abilities.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Stable host identifier.
    pub host_id: Name,
    /// Changes on every host boot; credit request ids are unique per (host, boot).
    pub boot_id: u64,
    /// Protocol version spoken by the host.
    pub version: u8,
    /// Bitset of [`caps`].
    pub capabilities: u32,
    /// Current telemetry period in milliseconds (0 = off).
    pub telemetry_period_ms: u32,
}

/// Resource a credit or a pool is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Resource {
    /// CPU credits (credit-ns of vCPU time above baseline).
    Cpu,
    /// Storage I/O credits (I/O operations above commitment).
    Io,
}

/// Per-vCPU telemetry over one window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct VcpuTelemetry {
    /// vCPU index within the VM.
    pub vcpu: u16,
    /// CPU time served within the baseline in this window.
    pub baseline_ns: u64,
    /// CPU time served above the baseline (paid with credits).
    pub burst_ns: u64,
    /// Credits earned (accrued) in this window.
    pub earned_ns: u64,
    /// Credits spent in this window.
    pub spent_ns: u64,
    /// Credits discarded at the balance cap in this window.
    pub discarded_ns: u64,
    /// Credits applied from pool grants in this window.
    pub granted_ns: u64,
    /// Balance at the end of the window (may be negative only transiently, see `sched`).
    pub balance_ns: i64,
    /// Time runnable but not running (throttled or waiting) in this window.
    pub throttled_ns: u64,
    /// Worst wake-to-run latency observed in this window.
    pub wake_latency_max_ns: u64,
    /// True when the vCPU runs in `unlimited` burst mode.
    pub unlimited: bool,
}

/// Per-volume telemetry over one window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct VolumeTelemetry {
    /// Volume index within the VM.
    pub volume: u16,
    /// Completed I/O operations per second over the window.
    pub iops: u32,
    /// Committed IOPS in force.
    pub committed_iops: u32,
    /// Limit in force (0 = none).
    pub limit_iops: u32,
    /// Queue-wait latency percentiles.
    pub latency_p50_ns: u64,
    /// 99th percentile queue-wait latency.
    pub latency_p99_ns: u64,
    /// Requests delayed by throttling in the window.
    pub throttled: u32,
}

/// One telemetry snapshot of one VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmTelemetry {
    /// Snapshot sequence number, +1 per snapshot per host (gaps mean lost snapshots).
    pub seq: u64,
    /// Host monotonic time at the end of the window.
    pub time_ns: u64,
    /// Window length.
    pub window_ns: u64,
    /// The VM.
    pub vm: VmId,
    /// Its vCPUs.
    pub vcpus: Vec<VcpuTelemetry, MAX_VCPUS>,
    /// Its volumes.
    pub volumes: Vec<VolumeTelemetry, MAX_VOLUMES>,
}

/// A host asks the agent for pool credits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreditRequest {
    /// Unique per (host, boot); a retry of the same need reuses the id.
    pub request_id: u64,
    /// Resource asked for.
    pub resource: Resource,
    /// The VM.
    pub vm: VmId,
    /// vCPU index (for `Cpu`) or volume index (for `Io`).
    pub unit: u16,
    /// Credits asked for, in credit-ns.
    pub amount_ns: u64,
    /// Current balance of the requester (used to prioritise).
    pub balance_ns: i64,
}

/// When a grant stage takes effect on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Instruction {
    /// Add to the balance at once.
    Now,
    /// Add `per_period_ns` each scheduling period until the stage is used up.
    Rate {
        /// Credits added per period.
        per_period_ns: u64,
    },
    /// Add when the event happens.
    AfterEvent(Event),
}

/// Host events a grant stage may wait for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Event {
    /// The VM finished migrating.
    MigrationComplete,
    /// The VM was resumed.
    Resumed,
}

/// One stage of a grant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stage {
    /// Credits in this stage.
    pub amount_ns: u64,
    /// When they take effect.
    pub instruction: Instruction,
}

/// A credit grant: applied at most once per `grant_id`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    /// Agent-wide unique grant id.
    pub grant_id: u64,
    /// The credit request it answers (0 = unsolicited).
    pub credit_request_id: u64,
    /// Resource.
    pub resource: Resource,
    /// The VM.
    pub vm: VmId,
    /// vCPU or volume index.
    pub unit: u16,
    /// Stages; their amounts sum to the grant.
    pub stages: Vec<Stage, MAX_STAGES>,
}

impl Grant {
    /// Total credits of the grant (saturating: a malformed grant cannot wrap).
    #[must_use]
    pub fn total_ns(&self) -> u64 {
        self.stages
            .iter()
            .fold(0u64, |acc, s| acc.saturating_add(s.amount_ns))
    }
}

/// VM lifecycle state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmState {
    /// Created, never started.
    Created,
    /// Running.
    Running,
    /// Paused.
    Paused,
    /// Destroyed (kept briefly for reporting).
    Destroyed,
}

/// vCPU burst mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BurstMode {
    /// Held to baseline at zero balance.
    Standard,
    /// Runs on and requests pool credits.
    Unlimited,
}

/// Scheduling parameters of one vCPU (see issue 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SchedParams {
    /// Baseline budget per period.
    pub budget_ns: u64,
    /// Baseline period (100 us ..= 1 s).
    pub period_ns: u64,
    /// Credits accrued per period.
    pub accrual_ns: u64,
    /// Balance cap.
    pub cap_ns: u64,
    /// Burst mode.
    pub burst: BurstMode,
    /// Burst weight.
    pub weight: u16,
}

/// Summary line of a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSummary {
    /// Host-local id.
    pub vm: VmId,
    /// Name.
    pub name: Name,
    /// State.
    pub state: VmState,
    /// Number of vCPUs.
    pub vcpus: u16,
}

/// Volume configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeInfo {
    /// Volume index.
    pub volume: u16,
    /// Committed IOPS.
    pub committed_iops: u32,
    /// Limit (0 = none).
    pub limit_iops: u32,
}

/// Full description of a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInfo {
    /// Summary.
    pub summary: VmSummary,
    /// Module it was created from.
    pub module: Name,
    /// Per-vCPU parameters.
    pub vcpus: Vec<SchedParams, MAX_VCPUS>,
    /// Volumes.
    pub volumes: Vec<VolumeInfo, MAX_VOLUMES>,
}

/// Balance of one vCPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuBalance {
    /// VM.
    pub vm: VmId,
    /// vCPU.
    pub vcpu: u16,
    /// Balance in credit-ns.
    pub balance_ns: i64,
    /// Grant credits not yet applied (staged).
    pub pending_ns: u64,
    /// Total credits applied from grants since boot.
    pub granted_total_ns: u64,
}

/// An agent command with its id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// Request id: unique and increasing per agent; retries reuse it.
    pub id: u64,
    /// The command.
    pub command: Command,
}

/// Commands from the agent.
// Bounded inline storage on purpose: the kernel side has no allocator to box the large variants.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Ask the host to (re)introduce itself; answered by a [`ToAgent::Hello`] and `Reply::Ack`.
    Attach,
    /// List VMs.
    ListVms,
    /// Describe one VM.
    DescribeVm {
        /// VM.
        vm: VmId,
    },
    /// Create a VM from a module already loaded on the host.
    CreateVm {
        /// Module name.
        module: Name,
        /// VM name.
        name: Name,
        /// vCPU parameters.
        vcpus: Vec<SchedParams, MAX_VCPUS>,
    },
    /// Start a created VM.
    StartVm {
        /// VM.
        vm: VmId,
    },
    /// Pause.
    PauseVm {
        /// VM.
        vm: VmId,
    },
    /// Resume.
    ResumeVm {
        /// VM.
        vm: VmId,
    },
    /// Destroy.
    DestroyVm {
        /// VM.
        vm: VmId,
    },
    /// Change one vCPU's scheduling parameters (through admission control).
    SetSchedParams {
        /// VM.
        vm: VmId,
        /// vCPU.
        vcpu: u16,
        /// New parameters.
        params: SchedParams,
    },
    /// Change a volume's commitment (through admission control).
    SetVolumeCommitment {
        /// VM.
        vm: VmId,
        /// Volume.
        volume: u16,
        /// Committed IOPS.
        committed_iops: u32,
        /// Limit (0 = none).
        limit_iops: u32,
    },
    /// Apply a credit grant (exactly once per grant id).
    ApplyGrant(Grant),
    /// Tell the host a credit request will not be granted, so it stops retrying it.
    DenyCredit {
        /// The host's credit request id.
        credit_request_id: u64,
        /// Why.
        reason: Reason,
    },
    /// Read balances (all VMs when `vm` is `None`).
    ReadBalances {
        /// VM filter.
        vm: Option<VmId>,
    },
    /// Set the telemetry period (0 = off).
    SetTelemetryPeriod {
        /// Milliseconds between snapshots.
        period_ms: u32,
    },
    /// Create and start a VM from one `[vm ...]` section of the host's configuration format (docs/vm-config.md;
    /// the image must be a boot module already loaded on the host). Answered by [`Reply::VmCreated`]; a malformed
    /// section (`ErrorCode::Invalid`, with the line and field), a missing module (`NotFound`) or a refusal by
    /// admission control (`Admission`, with its numbers) changes nothing.
    CreateVmConfig {
        /// The section's text (at most [`MAX_CONFIG_TEXT`] bytes).
        config: String<MAX_CONFIG_TEXT>,
    },
    /// List the VMs with ids from `first` on, at most [`MAX_VMS`] of them: answered by [`Reply::VmPage`], whose
    /// `next` names where the following page starts. `ListVmsFrom { first: 0 }` and then `next` until it is
    /// `None` reads every VM of the host, however many ([`Command::ListVms`] answers only the first page).
    ListVmsFrom {
        /// Lowest VM id wanted.
        first: VmId,
    },
    /// The balances of every VM's vCPUs from (`vm`, `vcpu`) on, in increasing (vm, vcpu) order, at most
    /// [`MAX_VMS`] of them: answered by [`Reply::BalancePage`], whose `next` names where the following page starts.
    /// `ReadBalancesFrom { vm: 0, vcpu: 0 }` and then `next` until it is `None` reads every vCPU of the host
    /// ([`Command::ReadBalances`] with no VM answers only the first [`MAX_VMS`]).
    ReadBalancesFrom {
        /// VM of the first vCPU wanted.
        vm: VmId,
        /// First vCPU wanted within `vm` (later VMs from vCPU 0).
        vcpu: u16,
    },
    /// The agent's own [`caps`], sent after every [`ToAgent::Hello`]; answered by `Reply::Ack`. Until it
    /// arrives (and again after every [`Command::Attach`], which may come from another agent) the host assumes
    /// an agent that knows none of the optional bits, so it sends every answer whole. A host older than this
    /// command drops the frame as malformed and never answers: the agent gives up after a short bounded wait
    /// and carries on (the host then answers whole anyway).
    AgentHello {
        /// Bitset of [`caps`] the agent understands (today only [`caps::ANSWER_PARTS`] means anything).
        capabilities: u32,
    },
}

impl Command {
    /// True when the command changes host state (and therefore must be deduplicated by request id).
    #[must_use]
    pub fn is_state_changing(&self) -> bool {
        !matches!(
            self,
            Self::Attach
                | Self::ListVms
                | Self::ListVmsFrom { .. }
                | Self::DescribeVm { .. }
                | Self::ReadBalances { .. }
                | Self::ReadBalancesFrom { .. }
                | Self::AgentHello { .. }
        )
    }
}

/// Reply to a [`Request`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    /// The request id answered.
    pub id: u64,
    /// Outcome.
    pub result: Result<Reply, CommandError>,
}

/// Successful outcomes.
// Bounded inline storage on purpose: the kernel side has no allocator to box the large variants.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    /// Done, nothing to report.
    Ack,
    /// VM list.
    VmList(Vec<VmSummary, MAX_VMS>),
    /// One VM.
    VmInfo(VmInfo),
    /// A VM was created.
    VmCreated {
        /// Its id.
        vm: VmId,
    },
    /// Balances.
    Balances(Vec<VcpuBalance, MAX_VMS>),
    /// A grant was applied now or before (`duplicate` tells which).
    GrantApplied {
        /// Grant id.
        grant_id: u64,
        /// True when this grant id had already been applied: nothing changed this time.
        duplicate: bool,
        /// Credits added to the balance at once.
        applied_now_ns: u64,
        /// Credits staged for later.
        pending_ns: u64,
    },
    /// One page of a VM listing (the answer to [`Command::ListVmsFrom`]), VMs in increasing id order.
    VmPage {
        /// The VMs of this page.
        vms: Vec<VmSummary, MAX_VMS>,
        /// Id to ask for next (`ListVmsFrom { first: next }`); `None` when this page ends the listing.
        next: Option<VmId>,
    },
    /// One page of the host's vCPU balances (the answer to [`Command::ReadBalancesFrom`]), in increasing
    /// (vm, vcpu) order.
    BalancePage {
        /// The balances of this page.
        balances: Vec<VcpuBalance, MAX_VMS>,
        /// (vm, vcpu) to ask for next; `None` when this page ends the listing.
        next: Option<(VmId, u16)>,
    },
}

/// The host side of [`Command::ListVmsFrom`]: the page starting at `first` of `vms` (the host's VMs in
/// increasing id order). At most [`MAX_VMS`] VMs; `next` is the id of the first VM left out, if any.
#[must_use]
pub fn vm_page(vms: impl IntoIterator<Item = VmSummary>, first: VmId) -> Reply {
    let mut page: Vec<VmSummary, MAX_VMS> = Vec::new();
    let mut next = None;
    for v in vms.into_iter().filter(|v| v.vm >= first) {
        if let Err(v) = page.push(v) {
            next = Some(v.vm);
            break;
        }
    }
    Reply::VmPage { vms: page, next }
}

/// The host side of [`Command::ReadBalancesFrom`]: the page of `balances` (the host's vCPUs, in any order) that
/// starts at (`vm`, `vcpu`): the [`MAX_VMS`] smallest (vm, vcpu) at or after it, in order; `next` is the smallest
/// one left out, if any.
#[must_use]
pub fn balance_page(balances: impl IntoIterator<Item = VcpuBalance>, vm: VmId, vcpu: u16) -> Reply {
    let key = |b: &VcpuBalance| (b.vm, b.vcpu);
    let mut page: Vec<VcpuBalance, MAX_VMS> = Vec::new();
    let mut next: Option<(VmId, u16)> = None;
    for b in balances.into_iter().filter(|b| key(b) >= (vm, vcpu)) {
        let at = page
            .iter()
            .position(|p| key(p) > key(&b))
            .unwrap_or(page.len());
        let left_out = if page.is_full() {
            if at == page.len() {
                Some(key(&b))
            } else {
                let last = page.pop().map(|p| key(&p));
                // Room was made above: the insert cannot fail.
                let _ = page.insert(at, b);
                last
            }
        } else {
            let _ = page.insert(at, b);
            None
        };
        if let Some(k) = left_out {
            next = Some(next.map_or(k, |n| n.min(k)));
        }
    }
    Reply::BalancePage {
        balances: page,
        next,
    }
}

/// Why a command failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    /// Unknown VM / vCPU / volume.
    NotFound,
    /// Admission control refused (reason has the numbers).
    Admission,
    /// The command is not valid in the current state.
    BadState,
    /// Invalid argument.
    Invalid,
    /// The request id is older than the host's dedup window: it was not executed now, and the host cannot say
    /// whether it was executed before. Resend the intent with a fresh request id (grant ids keep grants exactly once).
    Stale,
    /// The host does not implement this command.
    Unsupported,
}

/// A failed command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandError {
    /// Class.
    pub code: ErrorCode,
    /// Human-readable reason.
    pub reason: Reason,
}

impl CommandError {
    /// Builds an error; the reason is truncated at a character boundary to fit [`Reason`].
    #[must_use]
    pub fn new(code: ErrorCode, reason: &str) -> Self {
        Self {
            code,
            reason: truncated(reason),
        }
    }
}

/// Copies `s` into a bounded string, truncating at a character boundary.
#[must_use]
pub fn truncated<const N: usize>(s: &str) -> String<N> {
    let mut out = String::new();
    for ch in s.chars() {
        if out.push(ch).is_err() {
            break;
        }
    }
    out
}
