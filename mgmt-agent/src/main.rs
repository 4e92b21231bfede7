//! `cvctl`: the Creditvisor management agent (daemon and CLI). It owns what outlives one host: credit
//! pools, IOPS commitments and usage records.
//!
//! `cvctl agent` runs the daemon; every other subcommand is a client of its loopback API and prints a table
//! (or the raw JSON with `--json`). Bad input exits non-zero with the agent's message; nothing panics.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use mgmt_agent::agent::{self, AgentConfig};
use mgmt_agent::client::{field, table, Client};
use mgmt_agent::link::Address;
use mgmt_agent::policy::{fmt_credits, parse_credits, Discount, TierPolicy};
use mgmt_agent::{proxy, simhost, top};
use serde_json::{json, Value};

#[derive(Parser)]
#[command(
    name = "cvctl",
    version,
    about = "Creditvisor management agent and CLI"
)]
struct Cli {
    /// Agent API address.
    #[arg(
        long,
        global = true,
        default_value = "127.0.0.1:7878",
        env = "CVCTL_API"
    )]
    api: String,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the agent daemon.
    Agent {
        /// SQLite database file.
        #[arg(long, default_value = "cvctl.db")]
        db: PathBuf,
        /// Host channel: unix:PATH (QEMU chardev socket), tcp:HOST:PORT or serial:DEVICE. Repeatable.
        #[arg(long = "host", required = true)]
        hosts: Vec<String>,
        /// HTTP API listen address.
        #[arg(long, default_value = "127.0.0.1:7878")]
        listen: String,
        /// Write the bound API address to this file once listening.
        #[arg(long)]
        ready_file: Option<PathBuf>,
        /// Re-send unanswered commands after this many milliseconds.
        #[arg(long, default_value_t = 300)]
        retry_ms: u64,
        /// Ask for the VM list with ListVms (one page) after this many unanswered ListVmsFrom sends.
        #[arg(long, default_value_t = 20)]
        max_attempts: u32,
        /// Give up on an API command this many milliseconds after its first send (re-sent every retry-ms).
        #[arg(long, default_value_t = 20_000)]
        command_timeout_ms: u64,
        /// Automatic IOPS tiers, ascending, comma separated.
        #[arg(long, default_value = "200,350,500")]
        tiers: String,
        /// Price of a committed IOPS-month in dollars.
        #[arg(long, default_value = "0.30")]
        iops_month_price: String,
        /// Price of an overage IOPS-month in dollars.
        #[arg(long, default_value = "0.10")]
        overage_price: String,
        /// Never send AgentHello: behave as an agent from before it, so hosts answer whole (compatibility tests).
        #[arg(long)]
        no_agent_hello: bool,
    },
    /// Connected hosts.
    Hosts,
    /// VMs on all hosts.
    Vms,
    /// VM lifecycle and configuration.
    Vm {
        #[command(subcommand)]
        cmd: VmCmd,
    },
    /// Credit pools.
    Pools,
    /// Manage a credit pool.
    Pool {
        #[command(subcommand)]
        cmd: PoolCmd,
    },
    /// IOPS commitments.
    Commitments,
    /// Set or change a volume's IOPS commitment (the host's admission control decides).
    Commit {
        /// Host id.
        host: String,
        /// VM id.
        vm: u32,
        /// Volume index.
        volume: u16,
        /// Committed IOPS.
        iops: u32,
        /// IOPS limit (0 = none).
        #[arg(long, default_value_t = 0)]
        limit: u32,
        /// Let the agent move the commitment between tiers from telemetry.
        #[arg(long)]
        auto: bool,
    },
    /// Usage and cost per pool and per VM.
    Usage,
    /// Billing report: committed IOPS-months (prorated) and overage.
    Billing,
    /// Pool notifications (low balance, top-ups).
    Notifications,
    /// Ledger check: credits debited vs applied on hosts.
    Ledger,
    /// Prometheus metrics text.
    Metrics,
    /// Set a host's telemetry period.
    TelemetryPeriod {
        /// Host id.
        host: String,
        /// Milliseconds between snapshots (0 = off).
        period_ms: u32,
    },
    /// Live view.
    Top {
        /// Refresh interval in milliseconds.
        #[arg(long, default_value_t = 1000)]
        interval_ms: u64,
        /// Print one frame and exit.
        #[arg(long)]
        once: bool,
    },
    /// Run a simulated host (testing and demos).
    #[command(hide = true)]
    Simhost {
        /// Listen address (unix:PATH or tcp:HOST:PORT).
        #[arg(long)]
        listen: String,
        /// Host id.
        #[arg(long, default_value = "sim0")]
        host_id: String,
        /// Tick length in ms.
        #[arg(long, default_value_t = 10)]
        tick_ms: u64,
        /// Write a JSON report here every second.
        #[arg(long)]
        report: Option<PathBuf>,
    },
    /// Run a fault-injecting proxy (testing).
    #[command(hide = true)]
    Proxy {
        /// Listen address.
        #[arg(long)]
        listen: String,
        /// Target address.
        #[arg(long)]
        target: String,
        /// Bit flips per million bytes.
        #[arg(long, default_value_t = 200)]
        flip_ppm: u32,
        /// Drops per million bytes.
        #[arg(long, default_value_t = 200)]
        drop_ppm: u32,
        /// Duplications per million bytes.
        #[arg(long, default_value_t = 200)]
        dup_ppm: u32,
        /// Chunk replays per million chunks.
        #[arg(long, default_value_t = 5000)]
        replay_ppm: u32,
        /// Cut the target's output into chunks of at most this many bytes before the faults (0 = as read; 1 = the
        /// worst case, the same in every run).
        #[arg(long, default_value_t = 0)]
        target_chunk: usize,
        /// Seed.
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
}

#[derive(Subcommand)]
enum VmCmd {
    /// Start a created VM.
    Start { host: String, vm: u32 },
    /// Pause.
    Pause { host: String, vm: u32 },
    /// Resume.
    Resume { host: String, vm: u32 },
    /// Destroy.
    Destroy { host: String, vm: u32 },
    /// Describe.
    Describe { host: String, vm: u32 },
    /// Create a VM: from a `[vm ...]` section of the host's configuration format (`--config FILE`, see
    /// docs/vm-config.md; the kernel host), or from a loaded module and scheduling flags (all vCPUs alike).
    Create {
        host: String,
        /// A file holding one `[vm ...]` section; its image is a boot module already loaded on the host.
        #[arg(long, conflicts_with_all = ["module", "name"])]
        config: Option<std::path::PathBuf>,
        /// Module loaded on the host.
        #[arg(long, required_unless_present = "config")]
        module: Option<String>,
        /// VM name.
        #[arg(long, required_unless_present = "config")]
        name: Option<String>,
        /// vCPU count.
        #[arg(long, default_value_t = 1)]
        vcpus: u16,
        #[command(flatten)]
        sched: SchedArgs,
    },
    /// Change one vCPU's scheduling parameters (admission control decides).
    Sched {
        host: String,
        vm: u32,
        vcpu: u16,
        #[command(flatten)]
        sched: SchedArgs,
    },
    /// Read vCPU balances from a host.
    Balances { host: String },
}

#[derive(clap::Args)]
struct SchedArgs {
    /// Baseline budget per period, microseconds.
    #[arg(long, default_value_t = 2000)]
    budget_us: u64,
    /// Period, microseconds.
    #[arg(long, default_value_t = 10000)]
    period_us: u64,
    /// Credits accrued per period, microseconds.
    #[arg(long, default_value_t = 500)]
    accrual_us: u64,
    /// Balance cap, credits.
    #[arg(long, default_value = "1")]
    cap: String,
    /// Burst mode: standard or unlimited.
    #[arg(long, default_value = "standard")]
    burst: String,
    /// Burst weight.
    #[arg(long, default_value_t = 256)]
    weight: u16,
}

#[derive(Subcommand)]
enum PoolCmd {
    /// Create a pool.
    Create {
        name: String,
        /// cpu or io.
        #[arg(long, default_value = "cpu")]
        resource: String,
        /// Price per credit in dollars.
        #[arg(long, default_value = "0.05")]
        price: String,
        /// Volume discount MIN_CREDITS:PERCENT (repeatable).
        #[arg(long = "discount")]
        discounts: Vec<String>,
        /// manual | periodic:CREDITS:EVERY_S | auto:THRESHOLD:CREDITS:LIMIT_DOLLARS
        #[arg(long, default_value = "manual")]
        replenish: String,
        /// full | partial:PCT | by-balance | staged:NOW_PCT:PERIODS
        #[arg(long, default_value = "full")]
        strategy: String,
        /// Largest single grant, credits (0 = none).
        #[arg(long, default_value = "0")]
        max_grant: String,
        /// Notify below this balance, credits.
        #[arg(long, default_value = "0")]
        low: String,
    },
    /// Buy credits.
    Purchase { name: String, credits: String },
    /// Authorise a VM.
    Authorize { name: String, host: String, vm: u32 },
    /// De-authorise a VM.
    Deauthorize { name: String, host: String, vm: u32 },
    /// Show one pool.
    Show { name: String },
}

fn parse_money(text: &str) -> Result<u64, String> {
    let (i, f) = text
        .trim()
        .trim_start_matches('$')
        .split_once('.')
        .unwrap_or((text.trim().trim_start_matches('$'), ""));
    if i.is_empty() && f.is_empty()
        || f.len() > 6
        || !i.chars().chain(f.chars()).all(|c| c.is_ascii_digit())
    {
        return Err(format!(
            "'{text}' is not an amount in dollars with at most 6 decimals"
        ));
    }
    let whole: u64 = if i.is_empty() {
        0
    } else {
        i.parse().map_err(|_| format!("'{text}' is too large"))?
    };
    let frac: u64 = format!("{f:0<6}")
        .parse()
        .map_err(|_| format!("'{text}' is not a number"))?;
    whole
        .checked_mul(1_000_000)
        .and_then(|w| w.checked_add(frac))
        .ok_or_else(|| format!("'{text}' is too large"))
}

fn parts<'a>(text: &'a str, what: &str, n: usize) -> Result<Vec<&'a str>, String> {
    let p: Vec<&str> = text.split(':').collect();
    if p.len() == n {
        Ok(p)
    } else {
        Err(format!("{what} '{text}' needs {n} ':'-separated fields"))
    }
}

fn num<T: std::str::FromStr>(s: &str, what: &str) -> Result<T, String> {
    s.parse()
        .map_err(|_| format!("{what} '{s}' is not a valid number"))
}

fn replenish_json(text: &str) -> Result<Value, String> {
    match text.split(':').next().unwrap_or("") {
        "manual" => Ok(json!({ "kind": "manual" })),
        "periodic" => {
            let p = parts(text, "replenish", 3)?;
            Ok(json!({ "kind": "periodic", "amount_ns": parse_credits(p[1])?, "every_s": num::<u64>(p[2], "period")? }))
        }
        "auto" => {
            let p = parts(text, "replenish", 4)?;
            Ok(json!({ "kind": "auto", "threshold_ns": parse_credits(p[1])?, "amount_ns": parse_credits(p[2])?,
                       "spending_limit_micros": parse_money(p[3])? }))
        }
        _ => Err(format!("replenish '{text}' must be manual, periodic:CREDITS:EVERY_S or auto:THRESHOLD:CREDITS:LIMIT")),
    }
}

fn strategy_json(text: &str) -> Result<Value, String> {
    match text.split(':').next().unwrap_or("") {
        "full" => Ok(json!({ "kind": "full" })),
        "by-balance" => Ok(json!({ "kind": "by_balance" })),
        "partial" => Ok(
            json!({ "kind": "partial", "pct": num::<u8>(parts(text, "strategy", 2)?[1], "percent")? }),
        ),
        "staged" => {
            let p = parts(text, "strategy", 3)?;
            Ok(
                json!({ "kind": "staged", "now_pct": num::<u8>(p[1], "percent")?, "periods": num::<u32>(p[2], "periods")? }),
            )
        }
        _ => Err(format!(
            "strategy '{text}' must be full, partial:PCT, by-balance or staged:NOW_PCT:PERIODS"
        )),
    }
}

fn sched_json(a: &SchedArgs) -> Result<Value, String> {
    let burst = match a.burst.as_str() {
        "standard" => "Standard",
        "unlimited" => "Unlimited",
        other => {
            return Err(format!(
                "burst mode '{other}' must be standard or unlimited"
            ))
        }
    };
    let us = |v: u64, w: &str| {
        v.checked_mul(1000)
            .ok_or_else(|| format!("{w} {v} us is too large"))
    };
    Ok(json!({
        "budget_ns": us(a.budget_us, "budget")?, "period_ns": us(a.period_us, "period")?,
        "accrual_ns": us(a.accrual_us, "accrual")?, "cap_ns": parse_credits(&a.cap)?, "burst": burst, "weight": a.weight,
    }))
}

fn rows(v: &Value, key: &str, cols: &[&str]) -> Vec<Vec<String>> {
    v[key]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| cols.iter().map(|c| field(r, c)).collect())
        .collect()
}

fn credits(v: &Value, k: &str) -> String {
    fmt_credits(i128::from(v[k].as_i64().unwrap_or(0)))
}

fn dollars(v: &Value, k: &str) -> String {
    let m = v[k].as_u64().unwrap_or(0);
    format!("${}.{:06}", m / 1_000_000, m % 1_000_000)
}

fn client_cmd(cli: &Cli) -> Result<(), Box<dyn std::error::Error>> {
    let c = Client::new(&cli.api);
    let out = |v: &Value, text: String| {
        if cli.json {
            println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
        } else {
            print!("{text}");
        }
    };
    match &cli.cmd {
        Cmd::Hosts => {
            let v = c.get("/v1/hosts")?;
            let t = table(
                &[
                    "ADDRESS",
                    "HOST",
                    "CONNECTED",
                    "CONNECTS",
                    "FRAMES_OK",
                    "REJECTED",
                    "TEL_GAPS",
                    "HOST_REJECTED",
                    "COMPAT",
                ],
                &v["links"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|h| {
                        let rej = rejected(&h["decode"]);
                        vec![
                            field(h, "address"),
                            field(h, "host_id"),
                            field(h, "connected"),
                            field(h, "connects"),
                            field(&h["decode"], "ok"),
                            rej.to_string(),
                            field(h, "telemetry_gaps"),
                            if h["host_link"].is_object() {
                                rejected(&h["host_link"]["decode"]).to_string()
                            } else {
                                "-".to_string()
                            },
                            field(h, "compat"),
                        ]
                    })
                    .collect::<Vec<_>>(),
            );
            // Say why an incompatible host cannot be used (both protocol versions), under the table.
            let why: String = v["links"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|h| h["incompatible"].as_str())
                .map(|w| format!("incompatible: {w}\n"))
                .collect();
            out(&v, t + &why);
        }
        Cmd::Vms => {
            let v = c.get("/v1/vms")?;
            out(
                &v,
                table(
                    &["HOST", "VM", "NAME", "STATE", "VCPUS", "POOLS"],
                    &rows(
                        &v,
                        "vms",
                        &["host_id", "vm", "name", "state", "vcpus", "pools"],
                    ),
                ),
            );
        }
        Cmd::Vm { cmd } => {
            let v = match cmd {
                VmCmd::Start { host, vm } => {
                    c.post(&format!("/v1/vms/{host}/{vm}/start"), &json!({}))?
                }
                VmCmd::Pause { host, vm } => {
                    c.post(&format!("/v1/vms/{host}/{vm}/pause"), &json!({}))?
                }
                VmCmd::Resume { host, vm } => {
                    c.post(&format!("/v1/vms/{host}/{vm}/resume"), &json!({}))?
                }
                VmCmd::Destroy { host, vm } => {
                    c.post(&format!("/v1/vms/{host}/{vm}/destroy"), &json!({}))?
                }
                VmCmd::Describe { host, vm } => c.get(&format!("/v1/vms/{host}/{vm}"))?,
                VmCmd::Balances { host } => {
                    let v = c.get(&format!("/v1/balances/{host}"))?;
                    let r: Vec<Vec<String>> = v["Balances"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|b| {
                            vec![
                                field(b, "vm"),
                                field(b, "vcpu"),
                                credits(b, "balance_ns"),
                                credits(b, "pending_ns"),
                                credits(b, "granted_total_ns"),
                            ]
                        })
                        .collect();
                    out(
                        &v,
                        table(&["VM", "VCPU", "BALANCE", "PENDING", "GRANTED"], &r),
                    );
                    return Ok(());
                }
                VmCmd::Create {
                    host,
                    config: Some(path),
                    ..
                } => {
                    let text = std::fs::read_to_string(path)
                        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
                    c.post(&format!("/v1/hosts/{host}/vms"), &json!({ "config": text }))?
                }
                VmCmd::Create {
                    host,
                    module,
                    name,
                    vcpus,
                    sched,
                    ..
                } => {
                    let (Some(module), Some(name)) = (module, name) else {
                        return Err("vm create needs --config FILE, or --module and --name".into());
                    };
                    let p = sched_json(sched)?;
                    let list: Vec<Value> = (0..*vcpus).map(|_| p.clone()).collect();
                    c.post(
                        &format!("/v1/vms/{host}"),
                        &json!({ "module": module, "name": name, "vcpus": list }),
                    )?
                }
                VmCmd::Sched {
                    host,
                    vm,
                    vcpu,
                    sched,
                } => c.post(
                    &format!("/v1/vms/{host}/{vm}/vcpus/{vcpu}/sched"),
                    &sched_json(sched)?,
                )?,
            };
            out(&v, format!("{v}\n"));
        }
        Cmd::Pools => {
            let v = c.get("/v1/pools")?;
            let r: Vec<Vec<String>> = v["pools"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|p| {
                    vec![
                        field(p, "name"),
                        field(p, "resource"),
                        credits(p, "balance_ns"),
                        p["strategy"]["kind"].as_str().unwrap_or("-").into(),
                        p["replenish"]["kind"].as_str().unwrap_or("-").into(),
                        format!(
                            "${}",
                            p["pricing"]["price_micros"]
                                .as_u64()
                                .map_or(0.0, |m| m as f64 / 1e6)
                        ),
                        p["members"]
                            .as_array()
                            .map(|m| {
                                m.iter()
                                    .filter_map(Value::as_str)
                                    .collect::<Vec<_>>()
                                    .join(",")
                            })
                            .unwrap_or_default(),
                    ]
                })
                .collect();
            out(
                &v,
                table(
                    &[
                        "POOL",
                        "RES",
                        "BALANCE",
                        "STRATEGY",
                        "REPLENISH",
                        "PRICE",
                        "MEMBERS",
                    ],
                    &r,
                ),
            );
        }
        Cmd::Pool { cmd } => {
            let v = match cmd {
                PoolCmd::Create {
                    name,
                    resource,
                    price,
                    discounts,
                    replenish,
                    strategy,
                    max_grant,
                    low,
                } => {
                    let discounts: Vec<Discount> = discounts
                        .iter()
                        .map(|d| {
                            let p = parts(d, "discount", 2)?;
                            Ok(Discount {
                                min_credits: num(p[0], "credits")?,
                                pct: num(p[1], "percent")?,
                            })
                        })
                        .collect::<Result<_, String>>()?;
                    c.post(
                        "/v1/pools",
                        &json!({
                            "name": name, "resource": resource,
                            "pricing": { "price_micros": parse_money(price)?, "discounts": discounts },
                            "replenish": replenish_json(replenish)?, "strategy": strategy_json(strategy)?,
                            "max_grant_ns": parse_credits(max_grant)?, "low_balance_ns": parse_credits(low)?,
                        }),
                    )?
                }
                PoolCmd::Purchase { name, credits } => c.post(
                    &format!("/v1/pools/{name}/purchase"),
                    &json!({ "amount_ns": parse_credits(credits)? }),
                )?,
                PoolCmd::Authorize { name, host, vm } => c.post(
                    &format!("/v1/pools/{name}/authorize"),
                    &json!({ "host": host, "vm": vm }),
                )?,
                PoolCmd::Deauthorize { name, host, vm } => c.post(
                    &format!("/v1/pools/{name}/deauthorize"),
                    &json!({ "host": host, "vm": vm }),
                )?,
                PoolCmd::Show { name } => c.get(&format!("/v1/pools/{name}"))?,
            };
            out(&v, format!("{}\n", serde_json::to_string_pretty(&v)?));
        }
        Cmd::Commitments => {
            let v = c.get("/v1/commitments")?;
            out(
                &v,
                table(
                    &[
                        "HOST",
                        "VM",
                        "VOL",
                        "COMMITTED",
                        "LIMIT",
                        "AUTO",
                        "STATUS",
                        "REASON",
                    ],
                    &rows(
                        &v,
                        "commitments",
                        &[
                            "host_id",
                            "vm",
                            "volume",
                            "committed_iops",
                            "limit_iops",
                            "auto_tier",
                            "status",
                            "reason",
                        ],
                    ),
                ),
            );
        }
        Cmd::Commit {
            host,
            vm,
            volume,
            iops,
            limit,
            auto,
        } => {
            let v = c.post(
                "/v1/commitments",
                &json!({ "host": host, "vm": vm, "volume": volume, "committed_iops": iops, "limit_iops": limit, "auto_tier": auto }),
            )?;
            out(&v, format!("{v}\n"));
        }
        Cmd::Usage => {
            let v = c.get("/v1/usage")?;
            let p: Vec<Vec<String>> = v["pools"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|p| {
                    vec![
                        field(p, "pool"),
                        credits(p, "bought_ns"),
                        dollars(p, "bought_micros"),
                        credits(p, "granted_ns"),
                        field(p, "grants"),
                        field(p, "denied"),
                    ]
                })
                .collect();
            let m: Vec<Vec<String>> = v["vms"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|u| {
                    vec![
                        field(u, "host_id"),
                        field(u, "vm"),
                        credits(u, "baseline_ns"),
                        credits(u, "burst_ns"),
                        credits(u, "pool_credits_ns"),
                        dollars(u, "pool_cost_micros"),
                        credits(u, "throttled_ns"),
                        field(u, "io_ops"),
                    ]
                })
                .collect();
            out(
                &v,
                format!(
                    "{}\n{}",
                    table(
                        &["POOL", "BOUGHT", "COST", "GRANTED", "GRANTS", "DENIED"],
                        &p
                    ),
                    table(
                        &[
                            "HOST",
                            "VM",
                            "BASELINE",
                            "BURST",
                            "POOL_CREDITS",
                            "POOL_COST",
                            "THROTTLED",
                            "IO_OPS"
                        ],
                        &m
                    )
                ),
            );
        }
        Cmd::Billing => {
            let v = c.get("/v1/billing")?;
            let r: Vec<Vec<String>> = v["volumes"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|b| {
                    vec![
                        field(b, "host_id"),
                        field(b, "vm"),
                        field(b, "volume"),
                        field(b, "committed_iops_seconds"),
                        dollars(b, "commitment_micros"),
                        field(b, "overage_iops_seconds"),
                        dollars(b, "overage_micros"),
                    ]
                })
                .collect();
            out(
                &v,
                table(
                    &[
                        "HOST",
                        "VM",
                        "VOL",
                        "COMMITTED_IOPS_S",
                        "COMMIT_COST",
                        "OVERAGE_IOPS_S",
                        "OVERAGE_COST",
                    ],
                    &r,
                ),
            );
        }
        Cmd::Notifications => {
            let v = c.get("/v1/notifications")?;
            out(
                &v,
                table(
                    &["AT_MS", "POOL", "KIND", "MESSAGE"],
                    &rows(&v, "notifications", &["at", "pool", "kind", "message"]),
                ),
            );
        }
        Cmd::Ledger => {
            let v = c.get("/v1/ledger")?;
            out(
                &v,
                format!(
                    "debited {}  applied {}  refunded {}  in flight {}  consistent {}\n",
                    credits(&v, "debited_ns"),
                    credits(&v, "applied_ns"),
                    credits(&v, "refunded_ns"),
                    credits(&v, "in_flight_ns"),
                    field(&v, "pools_consistent")
                ),
            );
        }
        Cmd::Metrics => print!("{}", c.get_text("/metrics")?),
        Cmd::Top { interval_ms, once } => top::run(&c, Duration::from_millis(*interval_ms), *once)?,
        Cmd::TelemetryPeriod { host, period_ms } => {
            let v = c.post(
                &format!("/v1/hosts/{host}/telemetry"),
                &json!({ "period_ms": period_ms }),
            )?;
            out(&v, format!("{v}\n"));
        }
        Cmd::Agent { .. } | Cmd::Simhost { .. } | Cmd::Proxy { .. } => {
            return Err("daemon subcommands are not client commands".into());
        }
    }
    Ok(())
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
}

fn daemon(cmd: Cmd) -> Result<(), Box<dyn std::error::Error>> {
    match cmd {
        Cmd::Agent {
            db,
            hosts,
            listen,
            ready_file,
            retry_ms,
            max_attempts,
            command_timeout_ms,
            tiers,
            iops_month_price,
            overage_price,
            no_agent_hello,
        } => {
            let hosts = hosts
                .iter()
                .map(|h| h.parse::<Address>())
                .collect::<Result<Vec<_>, _>>()?;
            let tiers: Vec<u32> = tiers
                .split(',')
                .map(|t| num(t.trim(), "tier"))
                .collect::<Result<_, _>>()?;
            if tiers.is_empty() || retry_ms == 0 || max_attempts == 0 || command_timeout_ms == 0 {
                return Err(
                    "tiers, retry-ms, max-attempts and command-timeout-ms must be non-empty / positive"
                        .into(),
                );
            }
            let cfg = AgentConfig {
                db,
                hosts,
                listen,
                ready_file,
                retry: Duration::from_millis(retry_ms),
                max_attempts,
                command_timeout: Duration::from_millis(command_timeout_ms),
                tiers: TierPolicy {
                    tiers,
                    ..TierPolicy::default()
                },
                iops_month_micros: parse_money(&iops_month_price)?,
                overage_iops_month_micros: parse_money(&overage_price)?,
                announce: !no_agent_hello,
            };
            runtime()?.block_on(agent::run(cfg))?;
        }
        Cmd::Simhost {
            listen,
            host_id,
            tick_ms,
            report,
        } => {
            let addr: Address = listen.parse()?;
            if tick_ms == 0 {
                return Err("tick-ms must be positive".into());
            }
            runtime()?.block_on(simhost::run(
                simhost::SimConfig::demo(&host_id, tick_ms),
                &addr,
                report,
            ))?;
        }
        Cmd::Proxy {
            listen,
            target,
            flip_ppm,
            drop_ppm,
            dup_ppm,
            replay_ppm,
            target_chunk,
            seed,
        } => {
            let (l, t): (Address, Address) = (listen.parse()?, target.parse()?);
            runtime()?.block_on(async move {
                let faults = proxy::Faults {
                    flip_ppm,
                    drop_ppm,
                    dup_ppm,
                    replay_ppm,
                    target_chunk,
                    seed,
                };
                let (_, stats) = proxy::spawn(&l, t, faults).await?;
                tokio::spawn(async move {
                    loop {
                        tokio::time::sleep(Duration::from_secs(5)).await;
                        tracing::info!(
                            "proxy: {}",
                            serde_json::to_string(&*stats).unwrap_or_default()
                        );
                    }
                });
                tokio::signal::ctrl_c().await
            })?;
        }
        _ => return Err("client subcommands are not daemons".into()),
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = if matches!(
        cli.cmd,
        Cmd::Agent { .. } | Cmd::Simhost { .. } | Cmd::Proxy { .. }
    ) {
        tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .init();
        daemon(cli.cmd)
    } else {
        client_cmd(&cli)
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cvctl: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Rejected frames in a JSON `DecodeStats`.
fn rejected(decode: &serde_json::Value) -> u64 {
    [
        "oversized",
        "cobs_errors",
        "truncated",
        "crc_errors",
        "bad_version",
        "malformed",
        "replays",
    ]
    .iter()
    .map(|k| decode[k].as_u64().unwrap_or(0))
    .sum()
}
