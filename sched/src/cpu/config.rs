//! Plain-data configuration of the CPU scheduler: per-vCPU parameters and per-host parameters.
//!
//! Design: every type here is a plain struct or enum of integers (no pointers, no closures) so the kernel can
//! build it from a parsed VM configuration file and the management channel can replace it wholesale. All time
//! values are nanoseconds; all credit values are credit-nanoseconds (one credit-ns = one vCPU at 100% for one
//! ns; one user-visible credit = [`CREDIT_NS`]). Shares are parts per million ([`PPM`]).
//!
//! Invariants checked by [`VcpuConfig::validate`] and [`SchedParams::validate`] (never clamped silently):
//! `MIN_PERIOD_NS <= period <= MAX_PERIOD_NS`, `0 < budget <= period`, `weight >= 1`, a cap is at least the
//! baseline share and at most 100%, a launch balance is at most the balance cap.

/// Parts per million: the fixed-point unit of every utilisation and share.
pub const PPM: u64 = 1_000_000;
/// One user-visible CPU credit (one vCPU at 100% for one minute) in credit-nanoseconds.
pub const CREDIT_NS: u64 = 60_000_000_000;
/// Shortest allowed baseline period (100 us).
pub const MIN_PERIOD_NS: u64 = 100_000;
/// Longest allowed baseline period (1 s).
pub const MAX_PERIOD_NS: u64 = 1_000_000_000;

/// What a vCPU may do when its credit balance is empty.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "std", derive(serde::Serialize, serde::Deserialize))]
pub enum BurstMode {
    /// At zero balance the vCPU is held to its baseline.
    Standard,
    /// At zero balance the vCPU may overdraw up to `overdraft_limit_ns`; the credit-pool agent asks the
    /// management agent for credits to repay the overdraft. Once the overdraft limit is reached (the pool ran
    /// dry) the vCPU is held to its baseline like a standard one.
    Unlimited {
        /// Largest negative balance allowed, in credit-ns.
        overdraft_limit_ns: u64,
    },
}

/// When a vCPU asks the credit pool for credits (see `cpu::pool`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "std", derive(serde::Serialize, serde::Deserialize))]
pub struct PoolPolicy {
    /// Number of closed periods over which recent demand above baseline is averaged (>= 1).
    pub window_periods: u32,
    /// Horizon, in periods, for which a request should cover the pending demand at full speed (>= 1).
    pub horizon_periods: u32,
    /// Smallest request worth sending, in credit-ns (requests are rounded up to it).
    pub min_request_ns: u64,
    /// Periods after which an unanswered request may be repeated (>= 1).
    pub retry_periods: u32,
}

impl Default for PoolPolicy {
    fn default() -> Self {
        Self {
            window_periods: 8,
            horizon_periods: 100,
            min_request_ns: 1_000_000,
            retry_periods: 100,
        }
    }
}

/// Per-vCPU scheduling configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "std", derive(serde::Serialize, serde::Deserialize))]
pub struct VcpuConfig {
    /// Guaranteed CPU time per period (the real-time server budget), ns.
    pub budget_ns: u64,
    /// Period of the baseline server, ns, in `[MIN_PERIOD_NS, MAX_PERIOD_NS]`.
    pub period_ns: u64,
    /// Credits added at the end of every period, credit-ns (the same number every period).
    pub accrual_ns: u64,
    /// Largest balance; accrual beyond it is discarded and counted.
    pub balance_cap_ns: u64,
    /// Balance given at creation (a lot tagged with period 0), at most `balance_cap_ns`.
    pub launch_balance_ns: u64,
    /// Credits older than this many periods expire (counted separately); `None` = never.
    pub credit_lifetime_periods: Option<u32>,
    /// Behaviour at zero balance.
    pub burst_mode: BurstMode,
    /// Share of spare time among bursting vCPUs on the same CPU (>= 1).
    pub weight: u32,
    /// Largest total share (baseline + burst) per period, ppm; `None` = no cap.
    pub cap_ppm: Option<u32>,
    /// Credit-pool participation; `None` means "no pool" for standard vCPUs and the default policy for
    /// unlimited ones.
    pub pool: Option<PoolPolicy>,
}

impl VcpuConfig {
    /// A standard vCPU with `budget_ns` per `period_ns`, accruing its baseline amount per period, cap of
    /// 24 h of accrual, weight 256, no launch balance, no expiry, no share cap, no pool.
    #[must_use]
    pub fn baseline(budget_ns: u64, period_ns: u64) -> Self {
        Self {
            budget_ns,
            period_ns,
            accrual_ns: budget_ns,
            balance_cap_ns: budget_ns.saturating_mul(86_400_000_000_000 / period_ns.max(1)),
            launch_balance_ns: 0,
            credit_lifetime_periods: None,
            burst_mode: BurstMode::Standard,
            weight: 256,
            cap_ppm: None,
            pool: None,
        }
    }

    /// The I/O server of a CPU: `budget_ns` per `period_ns` of hypervisor I/O service time (virtqueue intake,
    /// NVMe submission and completion), admitted with the vCPUs' servers by the same check, so the theorem of
    /// [`super`] covers that time too. It is a real-time server only: it accrues no credits and holds none
    /// (accrual, cap and launch balance 0, standard burst mode), so it never enters the burst tier and runs at
    /// most `budget_ns + O` per period; spare time goes to the vCPUs. Weight 1 is never used (no burst).
    #[must_use]
    pub fn io_server(budget_ns: u64, period_ns: u64) -> Self {
        Self {
            budget_ns,
            period_ns,
            accrual_ns: 0,
            balance_cap_ns: 0,
            launch_balance_ns: 0,
            credit_lifetime_periods: None,
            burst_mode: BurstMode::Standard,
            weight: 1,
            cap_ppm: None,
            pool: None,
        }
    }

    /// Baseline share in ppm, rounded up (so sums of rounded shares bound the exact sum from above).
    #[must_use]
    pub fn baseline_ppm(&self) -> u64 {
        ceil_ppm(self.budget_ns, self.period_ns)
    }

    /// The pool policy in force: explicit, or the default for unlimited vCPUs.
    #[must_use]
    pub fn pool_policy(&self) -> Option<PoolPolicy> {
        match (self.pool, self.burst_mode) {
            (Some(p), _) => Some(p),
            (None, BurstMode::Unlimited { .. }) => Some(PoolPolicy::default()),
            (None, BurstMode::Standard) => None,
        }
    }

    /// Checks the invariants listed in the module header.
    ///
    /// # Errors
    /// The first violated invariant, with the offending value.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(MIN_PERIOD_NS..=MAX_PERIOD_NS).contains(&self.period_ns) {
            return Err(ConfigError::PeriodOutOfRange {
                period_ns: self.period_ns,
            });
        }
        if self.budget_ns == 0 || self.budget_ns > self.period_ns {
            return Err(ConfigError::BudgetOutOfRange {
                budget_ns: self.budget_ns,
                period_ns: self.period_ns,
            });
        }
        if self.weight == 0 {
            return Err(ConfigError::ZeroWeight);
        }
        if self.launch_balance_ns > self.balance_cap_ns {
            return Err(ConfigError::LaunchAboveCap {
                launch_ns: self.launch_balance_ns,
                cap_ns: self.balance_cap_ns,
            });
        }
        if self.credit_lifetime_periods == Some(0) {
            return Err(ConfigError::ZeroLifetime);
        }
        if let Some(cap) = self.cap_ppm {
            let cap = u64::from(cap);
            if cap > PPM || cap < self.baseline_ppm() {
                return Err(ConfigError::CapOutOfRange {
                    cap_ppm: cap,
                    baseline_ppm: self.baseline_ppm(),
                });
            }
        }
        if let Some(p) = self.pool {
            if p.window_periods == 0 || p.horizon_periods == 0 || p.retry_periods == 0 {
                return Err(ConfigError::BadPoolPolicy);
            }
        }
        Ok(())
    }
}

/// Why a [`VcpuConfig`] or [`SchedParams`] was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfigError {
    /// The period is outside `[MIN_PERIOD_NS, MAX_PERIOD_NS]`.
    PeriodOutOfRange {
        /// Offending period.
        period_ns: u64,
    },
    /// The budget is zero or longer than the period.
    BudgetOutOfRange {
        /// Offending budget.
        budget_ns: u64,
        /// Its period.
        period_ns: u64,
    },
    /// Weight zero would never get burst time.
    ZeroWeight,
    /// The launch balance exceeds the balance cap.
    LaunchAboveCap {
        /// Requested launch balance.
        launch_ns: u64,
        /// Balance cap.
        cap_ns: u64,
    },
    /// A credit lifetime of zero periods would expire every credit before use.
    ZeroLifetime,
    /// The share cap is above 100% or below the baseline share.
    CapOutOfRange {
        /// Requested cap.
        cap_ppm: u64,
        /// Baseline share it must not undercut.
        baseline_ppm: u64,
    },
    /// A pool policy window, horizon or retry interval is zero.
    BadPoolPolicy,
    /// Host parameters are inconsistent (see [`SchedParams::validate`]).
    BadParams,
}

impl core::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match *self {
            Self::PeriodOutOfRange { period_ns } => write!(
                f,
                "period {period_ns} ns outside [{MIN_PERIOD_NS}, {MAX_PERIOD_NS}] ns"
            ),
            Self::BudgetOutOfRange {
                budget_ns,
                period_ns,
            } => {
                write!(
                    f,
                    "budget {budget_ns} ns must be in (0, period {period_ns} ns]"
                )
            }
            Self::ZeroWeight => write!(f, "weight must be at least 1"),
            Self::LaunchAboveCap { launch_ns, cap_ns } => {
                write!(
                    f,
                    "launch balance {launch_ns} exceeds balance cap {cap_ns} credit-ns"
                )
            }
            Self::ZeroLifetime => write!(f, "credit lifetime must be at least one period"),
            Self::CapOutOfRange {
                cap_ppm,
                baseline_ppm,
            } => {
                write!(
                    f,
                    "cap {cap_ppm} ppm must be in [baseline {baseline_ppm} ppm, 1000000 ppm]"
                )
            }
            Self::BadPoolPolicy => write!(
                f,
                "pool window, horizon and retry must be at least 1 period"
            ),
            Self::BadParams => write!(f, "scheduler parameters inconsistent"),
        }
    }
}

/// Per-host scheduler parameters (the same for every physical CPU).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "std", derive(serde::Serialize, serde::Deserialize))]
pub struct SchedParams {
    /// Stated overrun bound O: the kernel guarantees `ran_ns <= slice_ns + O` for every slice, and re-picks
    /// within O after [`crate::cpu::Scheduler::wake`] asks for a preemption.
    pub overrun_bound_ns: u64,
    /// Extra per-CPU utilisation kept free (for time the kernel does not charge to any vCPU), ppm.
    pub reserve_ppm: u64,
    /// Minimum slice handed to the burst tier (unless cut by a real-time release or an empty balance).
    pub min_slice_ns: u64,
    /// Longest burst-tier slice (the round-robin quantum among bursting vCPUs).
    pub burst_quantum_ns: u64,
    /// Per-vCPU period records kept for [`crate::cpu::Scheduler::drain_telemetry`]; older ones are dropped
    /// (and counted) when nobody drains.
    pub telemetry_capacity: usize,
}

impl Default for SchedParams {
    fn default() -> Self {
        Self {
            overrun_bound_ns: 2_000,
            reserve_ppm: 0,
            min_slice_ns: 50_000,
            burst_quantum_ns: 1_000_000,
            telemetry_capacity: 4096,
        }
    }
}

impl SchedParams {
    /// `reserve_ppm < PPM`, `0 < min_slice_ns <= burst_quantum_ns`, and the overrun bound below the shortest
    /// period (else no vCPU could ever be admitted).
    ///
    /// # Errors
    /// [`ConfigError::BadParams`].
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.reserve_ppm >= PPM
            || self.min_slice_ns == 0
            || self.min_slice_ns > self.burst_quantum_ns
            || self.overrun_bound_ns >= MIN_PERIOD_NS
        {
            return Err(ConfigError::BadParams);
        }
        Ok(())
    }
}

/// `ceil(num * PPM / den)` without overflow (u128); `den` must be non-zero (callers validate periods).
#[must_use]
pub fn ceil_ppm(num: u64, den: u64) -> u64 {
    let den = u128::from(den.max(1));
    let v = (u128::from(num) * u128::from(PPM)).div_ceil(den);
    u64::try_from(v).unwrap_or(u64::MAX)
}
