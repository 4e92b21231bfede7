//! Durable state of the agent: an embedded SQLite database with versioned migrations.
//!
//! Design: one connection, owned by [`Store`] behind a mutex in the daemon; every ledger operation is one
//! `BEGIN IMMEDIATE` transaction that reads its inputs, calls the pure policy in [`crate::policy`], and writes
//! the outcome. The database runs in WAL mode with `synchronous=FULL`, so a committed transaction survives a
//! crash or `kill -9` of the agent.
//!
//! Invariants:
//! - Durable before acknowledged: a grant is debited from its pool and recorded as `debited` in the same
//!   committed transaction *before* it is sent to a host; it becomes `applied` only when the host acknowledges
//!   the grant id, or `refunded` (credited back, with a ledger row) when the host refuses it.
//! - Ledger identity: for every pool, `balance = sum(ledger.amount_ns)` (purchases, refills, top-ups and refunds
//!   positive, grants negative); `debited = applied + refunded + in flight`. [`Store::ledger_check`] verifies it.
//! - A credit request is answered once per (host, boot, request id): a retried request re-sends the recorded
//!   grant, never debits again.
//! - Pool balances never go negative (CHECK constraint) and bad input leaves no partial write.

use std::path::Path;

use proto::{CreditRequest, Grant, Instruction, Resource, Stage, VmTelemetry};
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use serde::{Deserialize, Serialize};

use crate::policy::{self, GrantDecision, GrantInput, Pricing, Replenish, Strategy, TierPolicy};

/// Errors of the store; the API maps them to HTTP statuses.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite failed.
    #[error("database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// Stored JSON could not be read back.
    #[error("corrupt stored value: {0}")]
    Json(#[from] serde_json::Error),
    /// The named thing does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The input is invalid.
    #[error("{0}")]
    Invalid(String),
    /// The input conflicts with existing state.
    #[error("{0}")]
    Conflict(String),
}

/// Result alias.
pub type Result<T> = std::result::Result<T, StoreError>;

const MIGRATIONS: &[&str] = &[
    // 1: initial schema.
    r"
    CREATE TABLE hosts(host_id TEXT PRIMARY KEY, address TEXT NOT NULL, boot_id INTEGER NOT NULL,
        version INTEGER NOT NULL, capabilities INTEGER NOT NULL, last_seen INTEGER NOT NULL);
    CREATE TABLE vms(host_id TEXT NOT NULL, vm INTEGER NOT NULL, name TEXT NOT NULL, state TEXT NOT NULL,
        vcpus INTEGER NOT NULL, updated INTEGER NOT NULL, PRIMARY KEY(host_id, vm));
    CREATE TABLE pools(name TEXT PRIMARY KEY, resource TEXT NOT NULL CHECK(resource IN ('cpu','io')),
        balance_ns INTEGER NOT NULL CHECK(balance_ns >= 0), pricing TEXT NOT NULL, replenish TEXT NOT NULL,
        strategy TEXT NOT NULL, max_grant_ns INTEGER NOT NULL, low_balance_ns INTEGER NOT NULL,
        topup_spent_micros INTEGER NOT NULL DEFAULT 0, next_refill INTEGER, low_notified INTEGER NOT NULL DEFAULT 0,
        created INTEGER NOT NULL);
    CREATE TABLE pool_members(pool TEXT NOT NULL REFERENCES pools(name), host_id TEXT NOT NULL, vm INTEGER NOT NULL,
        PRIMARY KEY(pool, host_id, vm));
    CREATE TABLE ledger(id INTEGER PRIMARY KEY AUTOINCREMENT, pool TEXT NOT NULL, at INTEGER NOT NULL,
        kind TEXT NOT NULL, amount_ns INTEGER NOT NULL, cost_micros INTEGER NOT NULL, host_id TEXT, vm INTEGER,
        grant_id INTEGER);
    CREATE TABLE credit_requests(host_id TEXT NOT NULL, boot_id INTEGER NOT NULL, request_id INTEGER NOT NULL,
        at INTEGER NOT NULL, resource TEXT NOT NULL, vm INTEGER NOT NULL, unit INTEGER NOT NULL,
        amount_ns INTEGER NOT NULL, balance_ns INTEGER NOT NULL, grant_id INTEGER, deny_reason TEXT,
        PRIMARY KEY(host_id, boot_id, request_id));
    CREATE TABLE grants(grant_id INTEGER PRIMARY KEY AUTOINCREMENT, pool TEXT NOT NULL, host_id TEXT NOT NULL,
        credit_request_id INTEGER NOT NULL, resource TEXT NOT NULL, vm INTEGER NOT NULL, unit INTEGER NOT NULL,
        amount_ns INTEGER NOT NULL, stages TEXT NOT NULL,
        status TEXT NOT NULL CHECK(status IN ('debited','applied','refunded')), created INTEGER NOT NULL,
        settled INTEGER);
    CREATE TABLE notifications(id INTEGER PRIMARY KEY AUTOINCREMENT, at INTEGER NOT NULL, pool TEXT,
        kind TEXT NOT NULL, message TEXT NOT NULL);
    CREATE TABLE usage(host_id TEXT NOT NULL, vm INTEGER NOT NULL, minute INTEGER NOT NULL,
        baseline_ns INTEGER NOT NULL, burst_ns INTEGER NOT NULL, spent_ns INTEGER NOT NULL,
        granted_ns INTEGER NOT NULL, throttled_ns INTEGER NOT NULL, io_ops INTEGER NOT NULL,
        PRIMARY KEY(host_id, vm, minute));
    CREATE TABLE commitments(host_id TEXT NOT NULL, vm INTEGER NOT NULL, volume INTEGER NOT NULL,
        committed_iops INTEGER NOT NULL, limit_iops INTEGER NOT NULL, auto_tier INTEGER NOT NULL,
        status TEXT NOT NULL, reason TEXT NOT NULL, updated INTEGER NOT NULL, PRIMARY KEY(host_id, vm, volume));
    CREATE TABLE commitment_periods(id INTEGER PRIMARY KEY AUTOINCREMENT, host_id TEXT NOT NULL,
        vm INTEGER NOT NULL, volume INTEGER NOT NULL, committed_iops INTEGER NOT NULL, start INTEGER NOT NULL,
        end INTEGER);
    CREATE TABLE iops_windows(host_id TEXT NOT NULL, vm INTEGER NOT NULL, volume INTEGER NOT NULL,
        at INTEGER NOT NULL, window_ms INTEGER NOT NULL, iops INTEGER NOT NULL, committed INTEGER NOT NULL,
        throttled INTEGER NOT NULL);
    ",
    // 2: indexes for the hot paths (grant resend, tier history).
    r"
    CREATE INDEX grants_open ON grants(host_id, status);
    CREATE INDEX iops_windows_vol ON iops_windows(host_id, vm, volume, at);
    ",
];

/// How a pool is configured (API input and output).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PoolSpec {
    /// Unique name.
    pub name: String,
    /// `cpu` or `io`.
    pub resource: String,
    /// Price list.
    #[serde(default)]
    pub pricing: Pricing,
    /// Replenishment.
    #[serde(default = "manual")]
    pub replenish: Replenish,
    /// Grant strategy.
    #[serde(default = "full")]
    pub strategy: Strategy,
    /// Per-grant maximum (0 = none).
    #[serde(default)]
    pub max_grant_ns: u64,
    /// Notify when the balance falls below this.
    #[serde(default)]
    pub low_balance_ns: u64,
}

fn manual() -> Replenish {
    Replenish::Manual
}
fn full() -> Strategy {
    Strategy::Full
}

/// A pool with its state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PoolView {
    /// Configuration.
    #[serde(flatten)]
    pub spec: PoolSpec,
    /// Balance.
    pub balance_ns: u64,
    /// Money spent by automatic top-ups.
    pub topup_spent_micros: u64,
    /// Authorised VMs as `host/vm`.
    pub members: Vec<String>,
}

/// Answer to a credit request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CreditOutcome {
    /// Send these grants (new or re-sent; the host applies each grant id once).
    Grants(Vec<Grant>),
    /// Tell the host no.
    Deny(String),
}

/// Sums proving the ledger balances.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct LedgerCheck {
    /// Credits debited from pools for grants.
    pub debited_ns: u64,
    /// Of which acknowledged as applied by hosts.
    pub applied_ns: u64,
    /// Of which refunded after a host refused the grant.
    pub refunded_ns: u64,
    /// Of which not yet acknowledged.
    pub in_flight_ns: u64,
    /// Grants by status.
    pub grants_applied: u64,
    /// Grants awaiting acknowledgement.
    pub grants_in_flight: u64,
    /// Every pool's balance equals the sum of its ledger rows.
    pub pools_consistent: bool,
}

/// One grant as recorded.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct GrantRow {
    /// Grant id.
    pub grant_id: u64,
    /// Pool debited.
    pub pool: String,
    /// Host.
    pub host_id: String,
    /// VM.
    pub vm: u32,
    /// vCPU or volume.
    pub unit: u16,
    /// Credits.
    pub amount_ns: u64,
    /// `debited`, `applied` or `refunded`.
    pub status: String,
    /// The host's credit request id.
    pub credit_request_id: u64,
}

/// One notification.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Notification {
    /// Unix ms.
    pub at: i64,
    /// Pool concerned.
    pub pool: Option<String>,
    /// Kind (`low_balance`, `topup`, `topup_refused`, `pool_empty`).
    pub kind: String,
    /// Text.
    pub message: String,
}

/// A commitment row.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CommitmentView {
    /// Host.
    pub host_id: String,
    /// VM.
    pub vm: u32,
    /// Volume.
    pub volume: u16,
    /// Committed IOPS (as asked when `pending`, as in force when `accepted`).
    pub committed_iops: u32,
    /// Limit.
    pub limit_iops: u32,
    /// Automatic tiers on.
    pub auto_tier: bool,
    /// `pending`, `accepted`, `refused`.
    pub status: String,
    /// Host's reason on refusal.
    pub reason: String,
}

/// Billing line of one volume.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BillingLine {
    /// Host.
    pub host_id: String,
    /// VM.
    pub vm: u32,
    /// Volume.
    pub volume: u16,
    /// Committed IOPS x seconds held.
    pub committed_iops_seconds: u64,
    /// Prorated cost of the commitment.
    pub commitment_micros: u64,
    /// IOPS-seconds above the commitment.
    pub overage_iops_seconds: u64,
    /// Cost of the overage.
    pub overage_micros: u64,
}

/// Per-VM usage and cost.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VmUsage {
    /// Host.
    pub host_id: String,
    /// VM.
    pub vm: u32,
    /// CPU time within baseline.
    pub baseline_ns: u64,
    /// CPU time above baseline.
    pub burst_ns: u64,
    /// Credits received from pools (acknowledged grants).
    pub pool_credits_ns: u64,
    /// Their value at list price.
    pub pool_cost_micros: u64,
    /// Throttled time.
    pub throttled_ns: u64,
    /// I/O operations.
    pub io_ops: u64,
}

/// Per-pool usage and cost.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PoolUsage {
    /// Pool.
    pub pool: String,
    /// Credits bought (purchases, refills, top-ups).
    pub bought_ns: u64,
    /// Money spent buying them.
    pub bought_micros: u64,
    /// Credits granted (net of refunds).
    pub granted_ns: u64,
    /// Number of grants.
    pub grants: u64,
    /// Credit requests denied.
    pub denied: u64,
}

fn i64_of(v: u64) -> Result<i64> {
    i64::try_from(v).map_err(|_| StoreError::Invalid(format!("value {v} out of range")))
}
fn u64_of(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}
fn resource_str(r: Resource) -> &'static str {
    match r {
        Resource::Cpu => "cpu",
        Resource::Io => "io",
    }
}
fn resource_of(s: &str) -> Resource {
    if s == "io" {
        Resource::Io
    } else {
        Resource::Cpu
    }
}

/// Pool columns read when answering a credit request: name, balance, strategy, pricing, replenish,
/// max grant, low-balance mark, top-up spending, low-balance notified flag.
type PoolRow = (String, i64, String, String, String, i64, i64, i64, i64);

/// The agent's database.
pub struct Store {
    conn: Connection,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Store")
    }
}

impl Store {
    /// Opens (creating if needed) and migrates the database at `path`.
    ///
    /// # Errors
    /// SQLite errors, or a database newer than this binary.
    pub fn open(path: &Path) -> Result<Self> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        let mut store = Self { conn };
        store.migrate()?;
        Ok(store)
    }

    fn migrate(&mut self) -> Result<()> {
        let have: i64 = self
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))?;
        let have = usize::try_from(have).unwrap_or(0);
        if have > MIGRATIONS.len() {
            return Err(StoreError::Conflict(format!(
                "database schema version {have} is newer than this cvctl ({})",
                MIGRATIONS.len()
            )));
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(have) {
            let tx = self.conn.transaction()?;
            tx.execute_batch(sql)?;
            tx.pragma_update(
                None,
                "user_version",
                i64_of(u64::try_from(i + 1).unwrap_or(u64::MAX))?,
            )?;
            tx.commit()?;
        }
        Ok(())
    }

    /// Schema version in use.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn schema_version(&self) -> Result<i64> {
        Ok(self
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))?)
    }

    // ---- hosts and VMs ----

    /// Records a host's hello.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn upsert_host(&self, h: &proto::Hello, address: &str, now: i64) -> Result<()> {
        self.conn.execute(
            "INSERT INTO hosts(host_id, address, boot_id, version, capabilities, last_seen) VALUES(?1,?2,?3,?4,?5,?6)
             ON CONFLICT(host_id) DO UPDATE SET address=?2, boot_id=?3, version=?4, capabilities=?5, last_seen=?6",
            params![h.host_id.as_str(), address, h.boot_id.cast_signed(), h.version, h.capabilities, now],
        )?;
        Ok(())
    }

    /// Marks a host seen now.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn touch_host(&self, host: &str, now: i64) -> Result<()> {
        self.conn.execute(
            "UPDATE hosts SET last_seen=?2 WHERE host_id=?1",
            params![host, now],
        )?;
        Ok(())
    }

    /// Hosts as JSON rows.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn hosts(&self) -> Result<Vec<serde_json::Value>> {
        let mut st = self
            .conn
            .prepare("SELECT host_id, address, boot_id, version, capabilities, last_seen FROM hosts ORDER BY host_id")?;
        let rows = st.query_map([], |r| {
            Ok(serde_json::json!({
                "host_id": r.get::<_, String>(0)?, "address": r.get::<_, String>(1)?,
                "boot_id": r.get::<_, i64>(2)?.cast_unsigned(), "version": r.get::<_, i64>(3)?,
                "capabilities": r.get::<_, i64>(4)?, "last_seen_ms": r.get::<_, i64>(5)?,
            }))
        })?;
        Ok(rows.collect::<std::result::Result<_, _>>()?)
    }

    /// Replaces the VM list of a host (resync).
    ///
    /// # Errors
    /// SQLite errors.
    pub fn replace_vms(&mut self, host: &str, vms: &[proto::VmSummary], now: i64) -> Result<()> {
        let tx = self.conn.transaction()?;
        tx.execute("DELETE FROM vms WHERE host_id=?1", params![host])?;
        for v in vms {
            tx.execute(
                "INSERT INTO vms(host_id, vm, name, state, vcpus, updated) VALUES(?1,?2,?3,?4,?5,?6)",
                params![host, v.vm, v.name.as_str(), format!("{:?}", v.state), v.vcpus, now],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Marks a VM destroyed (the host reported its end); a VM the store does not know yet is left to the next
    /// resync.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn vm_destroyed(&mut self, host: &str, vm: u32, now: i64) -> Result<()> {
        self.conn.execute(
            "UPDATE vms SET state=?3, updated=?4 WHERE host_id=?1 AND vm=?2",
            params![host, vm, format!("{:?}", proto::VmState::Destroyed), now],
        )?;
        Ok(())
    }

    /// VMs as JSON rows.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn vms(&self) -> Result<Vec<serde_json::Value>> {
        let mut st = self.conn.prepare(
            "SELECT v.host_id, v.vm, v.name, v.state, v.vcpus,
                (SELECT group_concat(pool) FROM pool_members m WHERE m.host_id=v.host_id AND m.vm=v.vm)
             FROM vms v ORDER BY v.host_id, v.vm",
        )?;
        let rows = st.query_map([], |r| {
            Ok(serde_json::json!({
                "host_id": r.get::<_, String>(0)?, "vm": r.get::<_, i64>(1)?, "name": r.get::<_, String>(2)?,
                "state": r.get::<_, String>(3)?, "vcpus": r.get::<_, i64>(4)?,
                "pools": r.get::<_, Option<String>>(5)?.unwrap_or_default(),
            }))
        })?;
        Ok(rows.collect::<std::result::Result<_, _>>()?)
    }

    // ---- pools ----

    /// Creates a pool with a zero balance.
    ///
    /// # Errors
    /// `Invalid` for bad fields, `Conflict` if the name exists.
    pub fn create_pool(&self, spec: &PoolSpec, now: i64) -> Result<()> {
        validate_pool(spec)?;
        let next_refill = match spec.replenish {
            Replenish::Periodic { every_s, .. } => {
                Some(now + i64_of(every_s.saturating_mul(1000))?)
            }
            _ => None,
        };
        let r = self.conn.execute(
            "INSERT INTO pools(name, resource, balance_ns, pricing, replenish, strategy, max_grant_ns, low_balance_ns,
                next_refill, created) VALUES(?1,?2,0,?3,?4,?5,?6,?7,?8,?9)",
            params![
                spec.name,
                spec.resource,
                serde_json::to_string(&spec.pricing)?,
                serde_json::to_string(&spec.replenish)?,
                serde_json::to_string(&spec.strategy)?,
                i64_of(spec.max_grant_ns)?,
                i64_of(spec.low_balance_ns)?,
                next_refill,
                now
            ],
        );
        match r {
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                Err(StoreError::Conflict(format!(
                    "pool '{}' already exists",
                    spec.name
                )))
            }
            Err(e) => Err(e.into()),
            Ok(_) => Ok(()),
        }
    }

    /// All pools.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn pools(&self) -> Result<Vec<PoolView>> {
        let names: Vec<String> = {
            let mut st = self.conn.prepare("SELECT name FROM pools ORDER BY name")?;
            let v = st
                .query_map([], |r| r.get(0))?
                .collect::<std::result::Result<_, _>>()?;
            v
        };
        names.iter().map(|n| self.pool(n)).collect()
    }

    /// One pool.
    ///
    /// # Errors
    /// `NotFound` if unknown.
    pub fn pool(&self, name: &str) -> Result<PoolView> {
        let row = self
            .conn
            .query_row(
                "SELECT name, resource, balance_ns, pricing, replenish, strategy, max_grant_ns, low_balance_ns,
                    topup_spent_micros FROM pools WHERE name=?1",
                params![name],
                |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, i64>(2)?,
                        r.get::<_, String>(3)?,
                        r.get::<_, String>(4)?,
                        r.get::<_, String>(5)?,
                        r.get::<_, i64>(6)?,
                        r.get::<_, i64>(7)?,
                        r.get::<_, i64>(8)?,
                    ))
                },
            )
            .optional()?
            .ok_or_else(|| StoreError::NotFound(format!("no pool named '{name}'")))?;
        let mut st = self
            .conn
            .prepare("SELECT host_id, vm FROM pool_members WHERE pool=?1 ORDER BY host_id, vm")?;
        let members = st
            .query_map(params![name], |r| {
                Ok(format!(
                    "{}/{}",
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)?
                ))
            })?
            .collect::<std::result::Result<_, _>>()?;
        Ok(PoolView {
            spec: PoolSpec {
                name: row.0,
                resource: row.1,
                pricing: serde_json::from_str(&row.3)?,
                replenish: serde_json::from_str(&row.4)?,
                strategy: serde_json::from_str(&row.5)?,
                max_grant_ns: u64_of(row.6),
                low_balance_ns: u64_of(row.7),
            },
            balance_ns: u64_of(row.2),
            topup_spent_micros: u64_of(row.8),
            members,
        })
    }

    /// Authorises (or with `allow = false` de-authorises) a VM to draw from a pool.
    ///
    /// # Errors
    /// `NotFound` for an unknown pool or membership.
    pub fn authorize(&self, pool: &str, host: &str, vm: u32, allow: bool) -> Result<()> {
        self.pool(pool)?;
        if allow {
            self.conn.execute(
                "INSERT OR IGNORE INTO pool_members(pool, host_id, vm) VALUES(?1,?2,?3)",
                params![pool, host, vm],
            )?;
        } else if self.conn.execute(
            "DELETE FROM pool_members WHERE pool=?1 AND host_id=?2 AND vm=?3",
            params![pool, host, vm],
        )? == 0
        {
            return Err(StoreError::NotFound(format!(
                "{host}/{vm} is not authorised in pool '{pool}'"
            )));
        }
        Ok(())
    }

    /// Buys credits into a pool; returns the cost in micro-dollars.
    ///
    /// # Errors
    /// `NotFound`, `Invalid` for a zero amount.
    pub fn purchase(&mut self, pool: &str, amount_ns: u64, now: i64) -> Result<u64> {
        if amount_ns == 0 {
            return Err(StoreError::Invalid(
                "purchase amount must be positive".into(),
            ));
        }
        let view = self.pool(pool)?;
        let cost = view.spec.pricing.cost_micros(amount_ns);
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        credit_pool(&tx, pool, "purchase", amount_ns, cost, now)?;
        tx.execute(
            "UPDATE pools SET low_notified=0 WHERE name=?1 AND balance_ns>=low_balance_ns",
            params![pool],
        )?;
        tx.commit()?;
        Ok(cost)
    }

    /// Performs due periodic refills; returns how many were made.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn periodic_refills(&mut self, now: i64) -> Result<usize> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let due: Vec<(String, String, String, i64)> = {
            let mut st = tx.prepare(
                "SELECT name, replenish, pricing, next_refill FROM pools WHERE next_refill IS NOT NULL AND next_refill<=?1",
            )?;
            let v = st
                .query_map(params![now], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
                })?
                .collect::<std::result::Result<_, _>>()?;
            v
        };
        let mut n = 0;
        for (name, rep, pricing, next) in due {
            if let Replenish::Periodic { amount_ns, every_s } = serde_json::from_str(&rep)? {
                let pricing: Pricing = serde_json::from_str(&pricing)?;
                credit_pool(
                    &tx,
                    &name,
                    "refill",
                    amount_ns,
                    pricing.cost_micros(amount_ns),
                    now,
                )?;
                let step = i64_of(every_s.max(1).saturating_mul(1000))?;
                // Skip missed periods instead of buying them all at once after downtime.
                let periods_missed = (now - next) / step;
                tx.execute(
                    "UPDATE pools SET next_refill=?2, low_notified=0 WHERE name=?1",
                    params![name, next + (periods_missed + 1) * step],
                )?;
                n += 1;
            }
        }
        tx.commit()?;
        Ok(n)
    }

    /// Answers a host's credit request, durably (see the module invariants).
    ///
    /// # Errors
    /// SQLite errors; the transaction is then rolled back and nothing was debited.
    pub fn handle_credit_request(
        &mut self,
        host: &str,
        boot_id: u64,
        req: &CreditRequest,
        now: i64,
    ) -> Result<CreditOutcome> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let boot = boot_id.cast_signed();
        let rid = req.request_id.cast_signed();
        let prior: Option<(Option<i64>, Option<String>)> = tx
            .query_row(
                "SELECT grant_id, deny_reason FROM credit_requests WHERE host_id=?1 AND boot_id=?2 AND request_id=?3",
                params![host, boot, rid],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        if let Some((grant, deny)) = prior {
            drop(tx);
            return match (grant, deny) {
                (Some(g), _) => Ok(CreditOutcome::Grants(vec![self.grant_by_id(g)?])),
                (None, reason) => Ok(CreditOutcome::Deny(
                    reason.unwrap_or_else(|| "denied".into()),
                )),
            };
        }
        let pool: Option<PoolRow> = tx
            .query_row(
                "SELECT p.name, p.balance_ns, p.strategy, p.pricing, p.replenish, p.max_grant_ns, p.low_balance_ns,
                    p.topup_spent_micros, p.low_notified
                 FROM pools p JOIN pool_members m ON m.pool=p.name
                 WHERE m.host_id=?1 AND m.vm=?2 AND p.resource=?3 ORDER BY p.balance_ns DESC, p.name LIMIT 1",
                params![host, req.vm, resource_str(req.resource)],
                |r| {
                    Ok((
                        r.get(0)?,
                        r.get(1)?,
                        r.get(2)?,
                        r.get(3)?,
                        r.get(4)?,
                        r.get(5)?,
                        r.get(6)?,
                        r.get(7)?,
                        r.get(8)?,
                    ))
                },
            )
            .optional()?;
        let decision = match &pool {
            None => GrantDecision::Deny(format!(
                "{host}/{} is not authorised in any {} pool",
                req.vm,
                resource_str(req.resource)
            )),
            Some((_, balance, strategy, ..)) => policy::decide_grant(
                serde_json::from_str(strategy)?,
                GrantInput {
                    requested_ns: req.amount_ns,
                    requester_balance_ns: req.balance_ns,
                    pool_balance_ns: u64_of(*balance),
                    max_grant_ns: pool.as_ref().map_or(0, |p| u64_of(p.5)),
                },
            ),
        };
        // Every answered request is recorded once, with either its denial reason or its grant.
        let amount_ns = i64_of(req.amount_ns)?;
        let record_request = |tx: &rusqlite::Transaction<'_>,
                              deny_reason: Option<&str>,
                              grant_id: Option<i64>| {
            tx.execute(
                "INSERT INTO credit_requests(host_id, boot_id, request_id, at, resource, vm, unit, amount_ns,
                    balance_ns, deny_reason, grant_id) VALUES(?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11)",
                params![
                    host,
                    boot,
                    rid,
                    now,
                    resource_str(req.resource),
                    req.vm,
                    req.unit,
                    amount_ns,
                    req.balance_ns,
                    deny_reason,
                    grant_id
                ],
            )
        };
        let outcome = match (decision, pool) {
            (GrantDecision::Deny(reason), pool) => {
                record_request(&tx, Some(&reason), None)?;
                if let Some((name, ..)) = pool {
                    tx.execute(
                        "INSERT INTO ledger(pool, at, kind, amount_ns, cost_micros, host_id, vm) VALUES(?1,?2,'deny',0,0,?3,?4)",
                        params![name, now, host, req.vm],
                    )?;
                }
                CreditOutcome::Deny(reason)
            }
            (
                GrantDecision::Grant(stages),
                Some((name, balance, _, pricing, replenish, _, low, spent, notified)),
            ) => {
                let total: u64 = stages.iter().map(|(a, _)| *a).sum();
                let stages: Vec<Stage> = stages
                    .into_iter()
                    .map(|(amount_ns, instruction)| Stage {
                        amount_ns,
                        instruction,
                    })
                    .collect();
                let pricing: Pricing = serde_json::from_str(&pricing)?;
                tx.execute(
                    "UPDATE pools SET balance_ns=balance_ns-?2 WHERE name=?1",
                    params![name, i64_of(total)?],
                )?;
                tx.execute(
                    "INSERT INTO grants(pool, host_id, credit_request_id, resource, vm, unit, amount_ns, stages, status, created)
                     VALUES(?1,?2,?3,?4,?5,?6,?7,?8,'debited',?9)",
                    params![
                        name,
                        host,
                        rid,
                        resource_str(req.resource),
                        req.vm,
                        req.unit,
                        i64_of(total)?,
                        serde_json::to_string(&stages)?,
                        now
                    ],
                )?;
                let grant_id = tx.last_insert_rowid();
                tx.execute(
                    "INSERT INTO ledger(pool, at, kind, amount_ns, cost_micros, host_id, vm, grant_id)
                     VALUES(?1,?2,'grant',?3,?4,?5,?6,?7)",
                    params![
                        name,
                        now,
                        -i64_of(total)?,
                        i64_of(pricing.list_value_micros(total))?,
                        host,
                        req.vm,
                        grant_id
                    ],
                )?;
                record_request(&tx, None, Some(grant_id))?;
                let mut new_balance = u64_of(balance).saturating_sub(total);
                let replenish: Replenish = serde_json::from_str(&replenish)?;
                if let Replenish::Auto { threshold_ns, .. } = replenish {
                    match policy::auto_topup(replenish, new_balance, u64_of(spent), &pricing) {
                        Some((amount, cost)) => {
                            credit_pool(&tx, &name, "topup", amount, cost, now)?;
                            tx.execute(
                                "UPDATE pools SET topup_spent_micros=topup_spent_micros+?2 WHERE name=?1",
                                params![name, i64_of(cost)?],
                            )?;
                            new_balance += amount;
                            notify(
                                &tx,
                                now,
                                &name,
                                "topup",
                                &format!("bought {amount} credit-ns for {cost} micro-$"),
                            )?;
                        }
                        None if new_balance < threshold_ns => {
                            notify(
                                &tx,
                                now,
                                &name,
                                "topup_refused",
                                "top-up not made: spending limit reached",
                            )?;
                        }
                        None => {}
                    }
                }
                if new_balance < u64_of(low) && notified == 0 {
                    notify(
                        &tx,
                        now,
                        &name,
                        "low_balance",
                        &format!("pool '{name}' balance {new_balance} ns below {low} ns"),
                    )?;
                    tx.execute(
                        "UPDATE pools SET low_notified=1 WHERE name=?1",
                        params![name],
                    )?;
                }
                tx.commit()?;
                return Ok(CreditOutcome::Grants(vec![self.grant_by_id(grant_id)?]));
            }
            (GrantDecision::Grant(_), None) => CreditOutcome::Deny("no pool".into()),
        };
        tx.commit()?;
        Ok(outcome)
    }

    fn grant_by_id(&self, grant_id: i64) -> Result<Grant> {
        let (cr, res, vm, unit, stages): (i64, String, u32, u16, String) = self.conn.query_row(
            "SELECT credit_request_id, resource, vm, unit, stages FROM grants WHERE grant_id=?1",
            params![grant_id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
        )?;
        let stages: Vec<Stage> = serde_json::from_str(&stages)?;
        Ok(Grant {
            grant_id: grant_id.cast_unsigned(),
            credit_request_id: cr.cast_unsigned(),
            resource: resource_of(&res),
            vm,
            unit,
            stages: stages.into_iter().take(proto::MAX_STAGES).collect(),
        })
    }

    /// Grants of `host` debited but not yet acknowledged (to re-send after a restart or reconnect).
    ///
    /// # Errors
    /// SQLite errors.
    pub fn unacked_grants(&self, host: &str) -> Result<Vec<Grant>> {
        let ids: Vec<i64> = {
            let mut st = self
                .conn
                .prepare("SELECT grant_id FROM grants WHERE host_id=?1 AND status='debited' ORDER BY grant_id")?;
            let v = st
                .query_map(params![host], |r| r.get(0))?
                .collect::<std::result::Result<_, _>>()?;
            v
        };
        ids.into_iter().map(|g| self.grant_by_id(g)).collect()
    }

    /// The host acknowledged a grant: mark it applied (idempotent).
    ///
    /// # Errors
    /// SQLite errors.
    pub fn grant_applied(&self, grant_id: u64, now: i64) -> Result<bool> {
        Ok(self.conn.execute(
            "UPDATE grants SET status='applied', settled=?2 WHERE grant_id=?1 AND status='debited'",
            params![grant_id.cast_signed(), now],
        )? == 1)
    }

    /// The host refused a grant (VM gone, ...): credit the pool back (idempotent).
    ///
    /// # Errors
    /// SQLite errors.
    pub fn grant_refused(&mut self, grant_id: u64, reason: &str, now: i64) -> Result<bool> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let row: Option<(String, i64)> = tx
            .query_row(
                "SELECT pool, amount_ns FROM grants WHERE grant_id=?1 AND status='debited'",
                params![grant_id.cast_signed()],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        let Some((pool, amount)) = row else {
            return Ok(false);
        };
        tx.execute(
            "UPDATE grants SET status='refunded', settled=?2 WHERE grant_id=?1",
            params![grant_id.cast_signed(), now],
        )?;
        tx.execute(
            "UPDATE pools SET balance_ns=balance_ns+?2 WHERE name=?1",
            params![pool, amount],
        )?;
        tx.execute(
            "INSERT INTO ledger(pool, at, kind, amount_ns, cost_micros, grant_id) VALUES(?1,?2,'refund',?3,0,?4)",
            params![pool, now, amount, grant_id.cast_signed()],
        )?;
        notify(
            &tx,
            now,
            &pool,
            "grant_refused",
            &format!("grant {grant_id} refused by host: {reason}"),
        )?;
        tx.commit()?;
        Ok(true)
    }

    /// All grants, oldest first.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn grants(&self) -> Result<Vec<GrantRow>> {
        let mut st = self.conn.prepare(
            "SELECT grant_id, pool, host_id, vm, unit, amount_ns, status, credit_request_id FROM grants ORDER BY grant_id",
        )?;
        let rows = st.query_map([], |r| {
            Ok(GrantRow {
                grant_id: r.get::<_, i64>(0)?.cast_unsigned(),
                pool: r.get(1)?,
                host_id: r.get(2)?,
                vm: r.get(3)?,
                unit: r.get(4)?,
                amount_ns: u64_of(r.get(5)?),
                status: r.get(6)?,
                credit_request_id: r.get::<_, i64>(7)?.cast_unsigned(),
            })
        })?;
        Ok(rows.collect::<std::result::Result<_, _>>()?)
    }

    /// Verifies the ledger identities.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn ledger_check(&self) -> Result<LedgerCheck> {
        let sum = |status: &str| -> Result<(u64, u64)> {
            Ok(self.conn.query_row(
                "SELECT COALESCE(SUM(amount_ns),0), COUNT(*) FROM grants WHERE status=?1",
                params![status],
                |r| Ok((u64_of(r.get(0)?), u64_of(r.get(1)?))),
            )?)
        };
        let (applied, n_applied) = sum("applied")?;
        let (refunded, _) = sum("refunded")?;
        let (in_flight, n_flight) = sum("debited")?;
        let debited: i64 = self.conn.query_row(
            "SELECT COALESCE(-SUM(amount_ns),0) FROM ledger WHERE kind='grant'",
            [],
            |r| r.get(0),
        )?;
        let inconsistent: i64 = self.conn.query_row(
            "SELECT COUNT(*) FROM pools p WHERE p.balance_ns != (SELECT COALESCE(SUM(amount_ns),0) FROM ledger l WHERE l.pool=p.name)",
            [],
            |r| r.get(0),
        )?;
        Ok(LedgerCheck {
            debited_ns: u64_of(debited),
            applied_ns: applied,
            refunded_ns: refunded,
            in_flight_ns: in_flight,
            grants_applied: n_applied,
            grants_in_flight: n_flight,
            pools_consistent: inconsistent == 0
                && u64_of(debited) == applied + refunded + in_flight,
        })
    }

    /// Recent notifications, newest first.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn notifications(&self, limit: u32) -> Result<Vec<Notification>> {
        let mut st = self.conn.prepare(
            "SELECT at, pool, kind, message FROM notifications ORDER BY id DESC LIMIT ?1",
        )?;
        let rows = st.query_map(params![limit], |r| {
            Ok(Notification {
                at: r.get(0)?,
                pool: r.get(1)?,
                kind: r.get(2)?,
                message: r.get(3)?,
            })
        })?;
        Ok(rows.collect::<std::result::Result<_, _>>()?)
    }

    // ---- telemetry, usage ----

    /// Folds one telemetry snapshot into per-minute usage and IOPS windows.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn record_telemetry(&mut self, host: &str, t: &VmTelemetry, now: i64) -> Result<()> {
        let tx = self.conn.transaction()?;
        let sum = |f: fn(&proto::VcpuTelemetry) -> u64| {
            t.vcpus.iter().map(f).fold(0u64, u64::saturating_add)
        };
        let window_ms = t.window_ns / 1_000_000;
        let io_ops: u64 = t
            .volumes
            .iter()
            .map(|v| u64::from(v.iops) * window_ms / 1000)
            .sum();
        tx.execute(
            "INSERT INTO usage(host_id, vm, minute, baseline_ns, burst_ns, spent_ns, granted_ns, throttled_ns, io_ops)
             VALUES(?1,?2,?3,?4,?5,?6,?7,?8,?9)
             ON CONFLICT(host_id, vm, minute) DO UPDATE SET baseline_ns=baseline_ns+?4, burst_ns=burst_ns+?5,
               spent_ns=spent_ns+?6, granted_ns=granted_ns+?7, throttled_ns=throttled_ns+?8, io_ops=io_ops+?9",
            params![
                host,
                t.vm,
                now / 60_000,
                i64_of(sum(|v| v.baseline_ns))?,
                i64_of(sum(|v| v.burst_ns))?,
                i64_of(sum(|v| v.spent_ns))?,
                i64_of(sum(|v| v.granted_ns))?,
                i64_of(sum(|v| v.throttled_ns))?,
                i64_of(io_ops)?
            ],
        )?;
        for v in &t.volumes {
            tx.execute(
                "INSERT INTO iops_windows(host_id, vm, volume, at, window_ms, iops, committed, throttled)
                 VALUES(?1,?2,?3,?4,?5,?6,?7,?8)",
                params![host, t.vm, v.volume, now, i64_of(window_ms)?, v.iops, v.committed_iops, v.throttled],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Usage and cost per VM.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn vm_usage(&self) -> Result<Vec<VmUsage>> {
        let mut st = self.conn.prepare(
            "SELECT k.host_id, k.vm,
               COALESCE((SELECT SUM(baseline_ns) FROM usage u WHERE u.host_id=k.host_id AND u.vm=k.vm),0),
               COALESCE((SELECT SUM(burst_ns) FROM usage u WHERE u.host_id=k.host_id AND u.vm=k.vm),0),
               COALESCE((SELECT SUM(amount_ns) FROM grants g WHERE g.host_id=k.host_id AND g.vm=k.vm AND g.status='applied'),0),
               COALESCE((SELECT SUM(l.cost_micros) FROM ledger l JOIN grants g ON g.grant_id=l.grant_id
                   WHERE l.kind='grant' AND g.host_id=k.host_id AND g.vm=k.vm AND g.status='applied'),0),
               COALESCE((SELECT SUM(throttled_ns) FROM usage u WHERE u.host_id=k.host_id AND u.vm=k.vm),0),
               COALESCE((SELECT SUM(io_ops) FROM usage u WHERE u.host_id=k.host_id AND u.vm=k.vm),0)
             FROM (SELECT host_id, vm FROM usage UNION SELECT host_id, vm FROM grants) k ORDER BY k.host_id, k.vm",
        )?;
        let rows = st.query_map([], |r| {
            Ok(VmUsage {
                host_id: r.get(0)?,
                vm: r.get(1)?,
                baseline_ns: u64_of(r.get(2)?),
                burst_ns: u64_of(r.get(3)?),
                pool_credits_ns: u64_of(r.get(4)?),
                pool_cost_micros: u64_of(r.get(5)?),
                throttled_ns: u64_of(r.get(6)?),
                io_ops: u64_of(r.get(7)?),
            })
        })?;
        Ok(rows.collect::<std::result::Result<_, _>>()?)
    }

    /// Usage and cost per pool.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn pool_usage(&self) -> Result<Vec<PoolUsage>> {
        let mut st = self.conn.prepare(
            "SELECT p.name,
               COALESCE((SELECT SUM(amount_ns) FROM ledger l WHERE l.pool=p.name AND kind IN ('purchase','refill','topup')),0),
               COALESCE((SELECT SUM(cost_micros) FROM ledger l WHERE l.pool=p.name AND kind IN ('purchase','refill','topup')),0),
               COALESCE((SELECT -SUM(amount_ns) FROM ledger l WHERE l.pool=p.name AND kind IN ('grant','refund')),0),
               (SELECT COUNT(*) FROM ledger l WHERE l.pool=p.name AND kind='grant'),
               (SELECT COUNT(*) FROM ledger l WHERE l.pool=p.name AND kind='deny')
             FROM pools p ORDER BY p.name",
        )?;
        let rows = st.query_map([], |r| {
            Ok(PoolUsage {
                pool: r.get(0)?,
                bought_ns: u64_of(r.get(1)?),
                bought_micros: u64_of(r.get(2)?),
                granted_ns: u64_of(r.get(3)?),
                grants: u64_of(r.get(4)?),
                denied: u64_of(r.get(5)?),
            })
        })?;
        Ok(rows.collect::<std::result::Result<_, _>>()?)
    }

    // ---- commitments ----

    /// Records a commitment change as asked (before the host answers).
    ///
    /// # Errors
    /// SQLite errors.
    pub fn commitment_asked(&self, c: &CommitmentView, now: i64) -> Result<()> {
        self.conn.execute(
            "INSERT INTO commitments(host_id, vm, volume, committed_iops, limit_iops, auto_tier, status, reason, updated)
             VALUES(?1,?2,?3,?4,?5,?6,'pending','',?7)
             ON CONFLICT(host_id, vm, volume) DO UPDATE SET committed_iops=?4, limit_iops=?5, auto_tier=?6,
               status='pending', reason='', updated=?7",
            params![c.host_id, c.vm, c.volume, c.committed_iops, c.limit_iops, c.auto_tier, now],
        )?;
        Ok(())
    }

    /// Records the host's answer; an accepted change closes the billing period in force and opens a new one.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn commitment_answer(
        &mut self,
        c: &CommitmentView,
        accepted: bool,
        reason: &str,
        now: i64,
    ) -> Result<()> {
        let tx = self.conn.transaction()?;
        tx.execute(
            "UPDATE commitments SET status=?4, reason=?5, updated=?6 WHERE host_id=?1 AND vm=?2 AND volume=?3",
            params![c.host_id, c.vm, c.volume, if accepted { "accepted" } else { "refused" }, reason, now],
        )?;
        if accepted {
            tx.execute(
                "UPDATE commitment_periods SET end=?4 WHERE host_id=?1 AND vm=?2 AND volume=?3 AND end IS NULL",
                params![c.host_id, c.vm, c.volume, now],
            )?;
            tx.execute(
                "INSERT INTO commitment_periods(host_id, vm, volume, committed_iops, start) VALUES(?1,?2,?3,?4,?5)",
                params![c.host_id, c.vm, c.volume, c.committed_iops, now],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Resynchronises the commitments in force on a host's VM (from a describe answer): a volume whose
    /// commitment differs from the record, and is not waiting for an answer, is recorded as accepted at the host's
    /// value, closing and opening billing periods; the auto-tier flag is kept.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn sync_commitments(
        &mut self,
        host: &str,
        vm: u32,
        volumes: &[proto::VolumeInfo],
        now: i64,
    ) -> Result<usize> {
        let known = self.commitments()?;
        let mut changed = 0;
        for v in volumes {
            let row = known
                .iter()
                .find(|c| c.host_id == host && c.vm == vm && c.volume == v.volume);
            if row.is_some_and(|c| {
                c.status == "pending"
                    || (c.status == "accepted" && c.committed_iops == v.committed_iops)
            }) {
                continue;
            }
            let c = CommitmentView {
                host_id: host.into(),
                vm,
                volume: v.volume,
                committed_iops: v.committed_iops,
                limit_iops: v.limit_iops,
                auto_tier: row.is_some_and(|c| c.auto_tier),
                status: "pending".into(),
                reason: String::new(),
            };
            self.commitment_asked(&c, now)?;
            self.commitment_answer(&c, true, "", now)?;
            changed += 1;
        }
        Ok(changed)
    }

    /// All commitments.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn commitments(&self) -> Result<Vec<CommitmentView>> {
        let mut st = self.conn.prepare(
            "SELECT host_id, vm, volume, committed_iops, limit_iops, auto_tier, status, reason FROM commitments
             ORDER BY host_id, vm, volume",
        )?;
        let rows = st.query_map([], |r| {
            Ok(CommitmentView {
                host_id: r.get(0)?,
                vm: r.get(1)?,
                volume: r.get(2)?,
                committed_iops: r.get(3)?,
                limit_iops: r.get(4)?,
                auto_tier: r.get(5)?,
                status: r.get(6)?,
                reason: r.get(7)?,
            })
        })?;
        Ok(rows.collect::<std::result::Result<_, _>>()?)
    }

    /// Proposes a tier change for an auto-tier volume from its recent windows (see [`policy::next_tier`]).
    ///
    /// # Errors
    /// SQLite errors.
    pub fn tier_proposal(
        &self,
        host: &str,
        vm: u32,
        volume: u16,
        tiers: &TierPolicy,
    ) -> Result<Option<CommitmentView>> {
        let Some(c) = self.commitments()?.into_iter().find(|c| {
            c.host_id == host
                && c.vm == vm
                && c.volume == volume
                && c.auto_tier
                && c.status == "accepted"
        }) else {
            return Ok(None);
        };
        let n = tiers.up_windows.max(tiers.down_windows);
        let since: i64 = self.conn.query_row(
            "SELECT COALESCE(MAX(start),0) FROM commitment_periods WHERE host_id=?1 AND vm=?2 AND volume=?3",
            params![host, vm, volume],
            |r| r.get(0),
        )?;
        let mut st = self.conn.prepare(
            "SELECT iops FROM iops_windows WHERE host_id=?1 AND vm=?2 AND volume=?3 AND at>?4 ORDER BY at DESC LIMIT ?5",
        )?;
        let mut hist: Vec<u32> = st
            .query_map(
                params![
                    host,
                    vm,
                    volume,
                    since,
                    i64_of(u64::try_from(n).unwrap_or(0))?
                ],
                |r| r.get(0),
            )?
            .collect::<std::result::Result<_, _>>()?;
        hist.reverse();
        Ok(
            policy::next_tier(tiers, c.committed_iops, &hist).map(|next| CommitmentView {
                committed_iops: next,
                ..c
            }),
        )
    }

    /// Billing report: prorated committed IOPS-months and overage, up to `now`.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn billing(
        &self,
        now: i64,
        price_micros: u64,
        overage_price_micros: u64,
    ) -> Result<Vec<BillingLine>> {
        let mut st = self.conn.prepare(
            "SELECT host_id, vm, volume,
               COALESCE((SELECT SUM(committed_iops * ((COALESCE(end, ?1) - start) / 1000)) FROM commitment_periods p
                  WHERE p.host_id=c.host_id AND p.vm=c.vm AND p.volume=c.volume),0),
               COALESCE((SELECT SUM(MAX(iops - committed, 0) * window_ms / 1000) FROM iops_windows w
                  WHERE w.host_id=c.host_id AND w.vm=c.vm AND w.volume=c.volume),0)
             FROM (SELECT DISTINCT host_id, vm, volume FROM commitment_periods
                   UNION SELECT DISTINCT host_id, vm, volume FROM iops_windows) c ORDER BY host_id, vm, volume",
        )?;
        let rows = st.query_map(params![now], |r| {
            let iops_s = u64_of(r.get(3)?);
            let over = u64_of(r.get(4)?);
            Ok(BillingLine {
                host_id: r.get(0)?,
                vm: r.get(1)?,
                volume: r.get(2)?,
                committed_iops_seconds: iops_s,
                commitment_micros: policy::commitment_cost_micros(1, iops_s, price_micros),
                overage_iops_seconds: over,
                overage_micros: policy::commitment_cost_micros(1, over, overage_price_micros),
            })
        })?;
        Ok(rows.collect::<std::result::Result<_, _>>()?)
    }
}

fn credit_pool(
    tx: &rusqlite::Transaction<'_>,
    pool: &str,
    kind: &str,
    amount: u64,
    cost: u64,
    now: i64,
) -> Result<()> {
    let amount = i64_of(amount)?;
    tx.execute(
        "UPDATE pools SET balance_ns=balance_ns+?2 WHERE name=?1",
        params![pool, amount],
    )?;
    tx.execute(
        "INSERT INTO ledger(pool, at, kind, amount_ns, cost_micros) VALUES(?1,?2,?3,?4,?5)",
        params![pool, now, kind, amount, i64_of(cost)?],
    )?;
    Ok(())
}

fn notify(
    tx: &rusqlite::Transaction<'_>,
    now: i64,
    pool: &str,
    kind: &str,
    message: &str,
) -> Result<()> {
    tracing::warn!(pool, kind, "{message}");
    tx.execute(
        "INSERT INTO notifications(at, pool, kind, message) VALUES(?1,?2,?3,?4)",
        params![now, pool, kind, message],
    )?;
    Ok(())
}

fn validate_pool(spec: &PoolSpec) -> Result<()> {
    let bad = |m: String| Err(StoreError::Invalid(m));
    if spec.name.is_empty()
        || spec.name.len() > 64
        || !spec
            .name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return bad(format!(
            "pool name '{}' must be 1-64 characters of [A-Za-z0-9-_.]",
            spec.name
        ));
    }
    if spec.resource != "cpu" && spec.resource != "io" {
        return bad(format!(
            "resource '{}' must be 'cpu' or 'io'",
            spec.resource
        ));
    }
    if spec.pricing.discounts.iter().any(|d| d.pct > 100) {
        return bad("a discount percentage exceeds 100".into());
    }
    match spec.strategy {
        Strategy::Partial { pct } if pct == 0 || pct > 100 => {
            return bad("partial pct must be 1..=100".into())
        }
        Strategy::Staged { now_pct, periods } if now_pct > 100 || periods == 0 => {
            return bad("staged needs now_pct <= 100 and periods >= 1".into())
        }
        _ => {}
    }
    match spec.replenish {
        Replenish::Periodic { amount_ns, every_s } if amount_ns == 0 || every_s == 0 => {
            bad("periodic replenishment needs amount_ns > 0 and every_s > 0".into())
        }
        Replenish::Auto { amount_ns: 0, .. } => bad("auto top-up needs amount_ns > 0".into()),
        _ => Ok(()),
    }
}

/// Lets tests and the API build grants' instruction text.
#[must_use]
pub fn describe_instruction(i: &Instruction) -> String {
    match i {
        Instruction::Now => "now".into(),
        Instruction::Rate { per_period_ns } => format!("{per_period_ns}/period"),
        Instruction::AfterEvent(e) => format!("after {e:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::CREDIT_NS;

    fn tmp(name: &str) -> std::path::PathBuf {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        std::env::temp_dir().join(format!("cvdb-{name}-{}-{nanos}.db", std::process::id()))
    }

    fn spec(name: &str) -> PoolSpec {
        PoolSpec {
            name: name.into(),
            resource: "cpu".into(),
            pricing: Pricing {
                price_micros: 50_000,
                discounts: vec![],
            },
            replenish: Replenish::Manual,
            strategy: Strategy::Full,
            max_grant_ns: 0,
            low_balance_ns: CREDIT_NS,
        }
    }

    fn req(id: u64, amount: u64) -> CreditRequest {
        CreditRequest {
            request_id: id,
            resource: Resource::Cpu,
            vm: 1,
            unit: 0,
            amount_ns: amount,
            balance_ns: 0,
        }
    }

    /// A grant debited before a crash survives it, is re-sent, and a retried request never debits twice.
    #[test]
    fn debit_is_durable_and_requests_are_answered_once() {
        let path = tmp("durable");
        {
            let mut s = Store::open(&path).unwrap();
            s.create_pool(&spec("p"), 0).unwrap();
            s.purchase("p", 10 * CREDIT_NS, 0).unwrap();
            s.authorize("p", "h", 1, true).unwrap();
            let CreditOutcome::Grants(g) = s
                .handle_credit_request("h", 1, &req(5, 4 * CREDIT_NS), 1)
                .unwrap()
            else {
                panic!("expected a grant")
            };
            assert_eq!(g[0].total_ns(), 4 * CREDIT_NS);
            // "Crash": drop the store without acknowledging.
        }
        let mut s = Store::open(&path).unwrap();
        assert_eq!(s.pool("p").unwrap().balance_ns, 6 * CREDIT_NS);
        let unacked = s.unacked_grants("h").unwrap();
        assert_eq!(unacked.len(), 1);
        // The host retries the same request: same grant, no second debit.
        let again = s
            .handle_credit_request("h", 1, &req(5, 4 * CREDIT_NS), 2)
            .unwrap();
        assert_eq!(again, CreditOutcome::Grants(unacked.clone()));
        assert_eq!(s.pool("p").unwrap().balance_ns, 6 * CREDIT_NS);
        // Same request id after a host reboot is a new request.
        assert!(matches!(
            s.handle_credit_request("h", 2, &req(5, CREDIT_NS), 3)
                .unwrap(),
            CreditOutcome::Grants(_)
        ));
        assert!(s.grant_applied(unacked[0].grant_id, 4).unwrap());
        assert!(
            !s.grant_applied(unacked[0].grant_id, 5).unwrap(),
            "idempotent"
        );
        let l = s.ledger_check().unwrap();
        assert!(l.pools_consistent);
        assert_eq!(
            (l.debited_ns, l.applied_ns, l.in_flight_ns),
            (5 * CREDIT_NS, 4 * CREDIT_NS, CREDIT_NS)
        );
        assert_eq!(
            s.schema_version().unwrap(),
            i64::try_from(MIGRATIONS.len()).unwrap()
        );
        let _ = std::fs::remove_file(&path);
    }

    /// An `io` pool answers only `Resource::Io` requests (a volume's, `unit` = volume index) and a `cpu` pool only
    /// CPU ones: the grant carries the resource and the volume, and the ledger balances in I/O credits.
    #[test]
    fn io_pool_grants_io_credits_to_a_volume() {
        let path = tmp("io");
        let mut s = Store::open(&path).unwrap();
        s.create_pool(
            &PoolSpec {
                resource: "io".into(),
                ..spec("iops")
            },
            0,
        )
        .unwrap();
        s.purchase("iops", 12_000, 0).unwrap();
        s.authorize("iops", "h", 1, true).unwrap();
        let io_req = |id, amount| CreditRequest {
            resource: Resource::Io,
            unit: 2,
            ..req(id, amount)
        };
        // A CPU request of the same VM finds no CPU pool.
        assert!(matches!(
            s.handle_credit_request("h", 1, &req(1, 100), 1).unwrap(),
            CreditOutcome::Deny(_)
        ));
        let CreditOutcome::Grants(g) = s
            .handle_credit_request("h", 1, &io_req(2, 5_000), 2)
            .unwrap()
        else {
            panic!("expected an I/O grant")
        };
        assert_eq!(
            (g[0].resource, g[0].unit, g[0].total_ns()),
            (Resource::Io, 2, 5_000)
        );
        // The next asks more than is left: the rest, then the empty pool denies.
        let CreditOutcome::Grants(g2) = s
            .handle_credit_request("h", 1, &io_req(3, 9_000), 3)
            .unwrap()
        else {
            panic!("expected an I/O grant")
        };
        assert_eq!(g2[0].total_ns(), 7_000);
        assert!(matches!(
            s.handle_credit_request("h", 1, &io_req(4, 1_000), 4)
                .unwrap(),
            CreditOutcome::Deny(_)
        ));
        assert!(s.grant_applied(g[0].grant_id, 5).unwrap());
        assert!(s.grant_applied(g2[0].grant_id, 5).unwrap());
        let l = s.ledger_check().unwrap();
        assert!(l.pools_consistent);
        assert_eq!(
            (l.debited_ns, l.applied_ns, l.in_flight_ns),
            (12_000, 12_000, 0)
        );
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn refusal_refunds_and_unauthorised_is_denied() {
        let path = tmp("refund");
        let mut s = Store::open(&path).unwrap();
        s.create_pool(&spec("p"), 0).unwrap();
        s.purchase("p", 2 * CREDIT_NS, 0).unwrap();
        assert!(
            matches!(s.handle_credit_request("h", 1, &req(1, CREDIT_NS), 1).unwrap(), CreditOutcome::Deny(r) if r.contains("not authorised"))
        );
        s.authorize("p", "h", 1, true).unwrap();
        let CreditOutcome::Grants(g) = s
            .handle_credit_request("h", 1, &req(2, CREDIT_NS), 1)
            .unwrap()
        else {
            panic!()
        };
        assert!(s.grant_refused(g[0].grant_id, "vm gone", 2).unwrap());
        assert!(
            !s.grant_refused(g[0].grant_id, "vm gone", 3).unwrap(),
            "refund once"
        );
        assert_eq!(s.pool("p").unwrap().balance_ns, 2 * CREDIT_NS);
        let l = s.ledger_check().unwrap();
        assert!(l.pools_consistent && l.refunded_ns == CREDIT_NS);
        // Bad input leaves nothing behind.
        assert!(matches!(
            s.create_pool(
                &PoolSpec {
                    resource: "gpu".into(),
                    ..spec("q")
                },
                0
            ),
            Err(StoreError::Invalid(_))
        ));
        assert!(matches!(
            s.create_pool(&spec("p"), 0),
            Err(StoreError::Conflict(_))
        ));
        assert!(matches!(
            s.purchase("nope", 1, 0),
            Err(StoreError::NotFound(_))
        ));
        assert!(matches!(s.purchase("p", 0, 0), Err(StoreError::Invalid(_))));
        assert_eq!(s.pools().unwrap().len(), 1);
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn auto_topup_and_periodic_refill() {
        let path = tmp("topup");
        let mut s = Store::open(&path).unwrap();
        let auto = PoolSpec {
            replenish: Replenish::Auto {
                threshold_ns: 2 * CREDIT_NS,
                amount_ns: 5 * CREDIT_NS,
                spending_limit_micros: 300_000,
            },
            ..spec("a")
        };
        s.create_pool(&auto, 0).unwrap();
        s.purchase("a", 3 * CREDIT_NS, 0).unwrap();
        s.authorize("a", "h", 1, true).unwrap();
        // 3 - 2 = 1 < 2: one top-up of 5 ($0.25), then the next one would exceed $0.30.
        s.handle_credit_request("h", 1, &req(1, 2 * CREDIT_NS), 1)
            .unwrap();
        assert_eq!(s.pool("a").unwrap().balance_ns, 6 * CREDIT_NS);
        s.handle_credit_request("h", 1, &req(2, 5 * CREDIT_NS), 2)
            .unwrap();
        assert_eq!(s.pool("a").unwrap().balance_ns, CREDIT_NS);
        assert!(s
            .notifications(10)
            .unwrap()
            .iter()
            .any(|n| n.kind == "topup_refused"));
        let periodic = PoolSpec {
            replenish: Replenish::Periodic {
                amount_ns: CREDIT_NS,
                every_s: 10,
            },
            ..spec("p")
        };
        s.create_pool(&periodic, 0).unwrap();
        assert_eq!(s.periodic_refills(9_999).unwrap(), 0);
        assert_eq!(s.periodic_refills(10_000).unwrap(), 1);
        // 35 s later: one refill, not three (missed periods are skipped).
        assert_eq!(s.periodic_refills(45_000).unwrap(), 1);
        assert_eq!(s.pool("p").unwrap().balance_ns, 2 * CREDIT_NS);
        assert!(s.ledger_check().unwrap().pools_consistent);
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn commitments_bill_prorated_and_overage() {
        let path = tmp("bill");
        let mut s = Store::open(&path).unwrap();
        let c = CommitmentView {
            host_id: "h".into(),
            vm: 1,
            volume: 0,
            committed_iops: 100,
            limit_iops: 0,
            auto_tier: false,
            status: "pending".into(),
            reason: String::new(),
        };
        s.commitment_asked(&c, 0).unwrap();
        s.commitment_answer(&c, true, "", 0).unwrap();
        let c2 = CommitmentView {
            committed_iops: 200,
            ..c.clone()
        };
        s.commitment_asked(&c2, 1_000_000).unwrap();
        s.commitment_answer(&c2, false, "Admission: no room", 1_000_000)
            .unwrap();
        let t = VmTelemetry {
            seq: 1,
            time_ns: 0,
            window_ns: 10_000_000_000,
            vm: 1,
            vcpus: heapless::Vec::new(),
            volumes: core::iter::once(proto::VolumeTelemetry {
                volume: 0,
                iops: 150,
                committed_iops: 100,
                ..Default::default()
            })
            .collect(),
        };
        s.record_telemetry("h", &t, 500_000).unwrap();
        let b = s.billing(2_000_000, 300_000, 100_000).unwrap();
        // 100 IOPS for 2000 s (the refused change did not start a period); 50 IOPS over for 10 s.
        assert_eq!(b[0].committed_iops_seconds, 200_000);
        assert_eq!(
            b[0].commitment_micros,
            policy::commitment_cost_micros(100, 2000, 300_000)
        );
        assert_eq!(b[0].overage_iops_seconds, 500);
        assert_eq!(s.commitments().unwrap()[0].status, "refused");
        // Resync from the host: the refused change is replaced by what the host enforces; unchanged rows stay.
        let host_view = [proto::VolumeInfo {
            volume: 0,
            committed_iops: 100,
            limit_iops: 0,
        }];
        assert_eq!(
            s.sync_commitments("h", 1, &host_view, 3_000_000).unwrap(),
            1
        );
        assert_eq!(
            s.sync_commitments("h", 1, &host_view, 3_000_000).unwrap(),
            0
        );
        assert_eq!(s.commitments().unwrap()[0].status, "accepted");
        let _ = std::fs::remove_file(&path);
    }
}
