//! JSON-over-HTTP API of the agent (loopback by default) and the Prometheus `/metrics` endpoint.
//!
//! Design: thin handlers over [`Shared`]: reads go to the store or the live telemetry map; host commands go to
//! the host's task and wait for its answer (bounded by the retry budget). Every rejection — bad JSON, bad path,
//! invalid values, unknown names, host refusals — becomes a 4xx/5xx with `{"error": "..."}`; nothing panics and
//! nothing is partially written (store operations are single transactions).

use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use proto::{Command, ErrorCode, Name, Reply, SchedParams, MAX_CONFIG_TEXT, MAX_VCPUS};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::oneshot;

use crate::agent::{now_ms, Shared};
use crate::db::{CommitmentView, PoolSpec, StoreError};
use crate::host::{CallError, HostCall};

/// An API error with its status.
#[derive(Debug)]
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        let status = match e {
            StoreError::NotFound(_) => StatusCode::NOT_FOUND,
            StoreError::Invalid(_) => StatusCode::BAD_REQUEST,
            StoreError::Conflict(_) => StatusCode::CONFLICT,
            StoreError::Sqlite(_) | StoreError::Json(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self(status, e.to_string())
    }
}

impl From<JsonRejection> for ApiError {
    fn from(e: JsonRejection) -> Self {
        Self(
            StatusCode::BAD_REQUEST,
            format!("bad JSON body: {}", e.body_text()),
        )
    }
}

impl From<PathRejection> for ApiError {
    fn from(e: PathRejection) -> Self {
        Self(
            StatusCode::BAD_REQUEST,
            format!("bad path: {}", e.body_text()),
        )
    }
}

impl From<CallError> for ApiError {
    fn from(e: CallError) -> Self {
        let status = match &e {
            CallError::NotConnected(_) => StatusCode::SERVICE_UNAVAILABLE,
            CallError::Incompatible(_) => StatusCode::BAD_GATEWAY,
            CallError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            CallError::Host(code, _) => match code {
                ErrorCode::NotFound => StatusCode::NOT_FOUND,
                ErrorCode::Admission | ErrorCode::BadState | ErrorCode::Stale => {
                    StatusCode::CONFLICT
                }
                ErrorCode::Invalid => StatusCode::BAD_REQUEST,
                ErrorCode::Unsupported => StatusCode::NOT_IMPLEMENTED,
            },
        };
        Self(status, e.to_string())
    }
}

type ApiResult = Result<Json<Value>, ApiError>;
type St = State<Arc<Shared>>;

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, msg.into())
}

/// Builds the router.
pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/v1/hosts", get(hosts))
        .route("/v1/hosts/{host}/telemetry", post(set_telemetry_period))
        .route("/v1/hosts/{host}/vms", post(create_vm_config))
        .route("/v1/vms", get(vms))
        .route("/v1/vms/{host}", post(create_vm))
        .route("/v1/vms/{host}/{vm}", get(describe_vm))
        .route("/v1/vms/{host}/{vm}/{action}", post(vm_action))
        .route("/v1/vms/{host}/{vm}/vcpus/{vcpu}/sched", post(set_sched))
        .route("/v1/balances/{host}", get(balances))
        .route("/v1/pools", get(pools).post(create_pool))
        .route("/v1/pools/{name}", get(pool))
        .route("/v1/pools/{name}/purchase", post(purchase))
        .route("/v1/pools/{name}/authorize", post(authorize))
        .route("/v1/pools/{name}/deauthorize", post(deauthorize))
        .route("/v1/commitments", get(commitments).post(set_commitment))
        .route("/v1/usage", get(usage))
        .route("/v1/billing", get(billing))
        .route("/v1/telemetry", get(telemetry))
        .route("/v1/notifications", get(notifications))
        .route("/v1/ledger", get(ledger))
        .route("/v1/grants", get(grants))
        .route("/metrics", get(metrics))
        .fallback(|| async { ApiError(StatusCode::NOT_FOUND, "no such endpoint".into()) })
        .with_state(shared)
}

async fn call_host(
    s: &Shared,
    host: &str,
    command: Command,
    commitment: Option<CommitmentView>,
) -> Result<Reply, ApiError> {
    let link = s
        .link(host)
        .ok_or_else(|| match s.host_incompatible(host) {
            Some(why) => CallError::Incompatible(why).into(),
            None => ApiError(
                StatusCode::NOT_FOUND,
                format!("host '{host}' is unknown or not connected"),
            ),
        })?;
    let (reply, rx) = oneshot::channel();
    link.send(HostCall {
        command,
        reply,
        commitment,
    })
    .await
    .map_err(|_| {
        ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("host '{host}' task stopped"),
        )
    })?;
    // The host task answers by the command's budget; this is only a backstop.
    let budget = s.cfg.command_timeout + s.cfg.retry * 2 + std::time::Duration::from_secs(1);
    match tokio::time::timeout(budget, rx).await {
        Ok(Ok(r)) => Ok(r?),
        Ok(Err(_)) => Err(CallError::NotConnected(host.into()).into()),
        Err(_) => Err(CallError::Timeout {
            attempts: 0,
            waited_ms: u64::try_from(budget.as_millis()).unwrap_or(u64::MAX),
        }
        .into()),
    }
}

fn reply_json(r: &Reply) -> ApiResult {
    serde_json::to_value(r)
        .map(Json)
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
}

async fn hosts(State(s): St) -> ApiResult {
    let stored = s.with_store(|st| st.hosts())?;
    let live: Vec<_> = s
        .hosts
        .lock()
        .map(|h| h.values().cloned().collect())
        .unwrap_or_default();
    Ok(Json(json!({ "hosts": stored, "links": live })))
}

async fn vms(State(s): St) -> ApiResult {
    Ok(Json(json!({ "vms": s.with_store(|st| st.vms())? })))
}

fn bounded_name(field: &str, v: &str) -> Result<Name, ApiError> {
    if v.is_empty() || v.len() > 32 {
        return Err(bad(format!("{field} must be 1..=32 bytes")));
    }
    Ok(proto::truncated(v))
}

#[derive(Deserialize)]
struct CreateVm {
    module: String,
    name: String,
    vcpus: Vec<SchedParams>,
}

async fn create_vm(
    State(s): St,
    p: Result<Path<String>, PathRejection>,
    b: Result<Json<CreateVm>, JsonRejection>,
) -> ApiResult {
    let Path(host) = p?;
    let Json(b) = b?;
    if b.vcpus.is_empty() || b.vcpus.len() > MAX_VCPUS {
        return Err(bad(format!("a VM needs 1..={MAX_VCPUS} vCPUs")));
    }
    let cmd = Command::CreateVm {
        module: bounded_name("module", &b.module)?,
        name: bounded_name("name", &b.name)?,
        vcpus: b.vcpus.into_iter().collect(),
    };
    reply_json(&call_host(&s, &host, cmd, None).await?)
}

#[derive(Deserialize)]
struct CreateVmConfig {
    config: String,
}

/// Creates a VM from one `[vm ...]` section of the host's configuration format; the host parses it and answers
/// with the new VM's id, or with the line and field of a malformed section, or admission's numbers.
async fn create_vm_config(
    State(s): St,
    p: Result<Path<String>, PathRejection>,
    b: Result<Json<CreateVmConfig>, JsonRejection>,
) -> ApiResult {
    let Path(host) = p?;
    let Json(b) = b?;
    if b.config.trim().is_empty() {
        return Err(bad("config is empty: give one [vm ...] section"));
    }
    if b.config.len() > MAX_CONFIG_TEXT {
        return Err(bad(format!(
            "config is {} bytes; at most {MAX_CONFIG_TEXT}",
            b.config.len()
        )));
    }
    let cmd = Command::CreateVmConfig {
        config: proto::truncated(&b.config),
    };
    reply_json(&call_host(&s, &host, cmd, None).await?)
}

async fn describe_vm(State(s): St, p: Result<Path<(String, u32)>, PathRejection>) -> ApiResult {
    let Path((host, vm)) = p?;
    reply_json(&call_host(&s, &host, Command::DescribeVm { vm }, None).await?)
}

async fn vm_action(
    State(s): St,
    p: Result<Path<(String, u32, String)>, PathRejection>,
) -> ApiResult {
    let Path((host, vm, action)) = p?;
    let cmd = match action.as_str() {
        "start" => Command::StartVm { vm },
        "pause" => Command::PauseVm { vm },
        "resume" => Command::ResumeVm { vm },
        "destroy" => Command::DestroyVm { vm },
        other => {
            return Err(bad(format!(
                "unknown action '{other}' (start, pause, resume, destroy)"
            )))
        }
    };
    reply_json(&call_host(&s, &host, cmd, None).await?)
}

async fn set_sched(
    State(s): St,
    p: Result<Path<(String, u32, u16)>, PathRejection>,
    b: Result<Json<SchedParams>, JsonRejection>,
) -> ApiResult {
    let Path((host, vm, vcpu)) = p?;
    let Json(params) = b?;
    reply_json(
        &call_host(
            &s,
            &host,
            Command::SetSchedParams { vm, vcpu, params },
            None,
        )
        .await?,
    )
}

/// Most pages one balance listing reads (a host's table holds 256 vCPUs: 8 pages; the margin bounds a host that
/// never ends its listing).
const MAX_BALANCE_PAGES: usize = 64;

/// Every vCPU's balance on `host`, answered as one `Balances` list: read page by page (`ReadBalancesFrom`) from a
/// host that announced `caps::BALANCE_PAGES`, else VM by VM (`ReadBalances`) over the host's VMs as the agent
/// last listed them (a host from before pages drops `ReadBalancesFrom` and would never answer).
async fn balances(State(s): St, p: Result<Path<String>, PathRejection>) -> ApiResult {
    let Path(host) = p?;
    let paged = s
        .host_capabilities(&host)
        .is_some_and(|c| c & proto::caps::BALANCE_PAGES != 0);
    if !paged {
        return balances_by_vm(&s, &host).await;
    }
    let mut all: Vec<proto::VcpuBalance> = Vec::new();
    let mut from = (0, 0);
    for _ in 0..MAX_BALANCE_PAGES {
        let command = Command::ReadBalancesFrom {
            vm: from.0,
            vcpu: from.1,
        };
        match call_host(&s, &host, command, None).await? {
            Reply::BalancePage { balances, next } => {
                all.extend(balances);
                match next {
                    // A page must move forward, or the listing would never end.
                    Some(n) if n > from => from = n,
                    Some(n) => {
                        return Err(ApiError(
                            StatusCode::BAD_GATEWAY,
                            format!(
                            "host '{host}' sent a balance page that does not move forward ({n:?})"
                        ),
                        ))
                    }
                    None => return Ok(Json(json!({ "Balances": all }))),
                }
            }
            other => {
                return Err(ApiError(
                    StatusCode::BAD_GATEWAY,
                    format!("host '{host}' answered a balance page with {other:?}"),
                ))
            }
        }
    }
    Err(ApiError(
        StatusCode::BAD_GATEWAY,
        format!("host '{host}' listed more than {MAX_BALANCE_PAGES} pages of balances"),
    ))
}

/// The balances of `host` one VM at a time, for a host without balance pages. A VM destroyed meanwhile
/// (`NotFound`) has no balances left and is skipped.
async fn balances_by_vm(s: &Shared, host: &str) -> ApiResult {
    let destroyed = format!("{:?}", proto::VmState::Destroyed);
    let vms: Vec<u32> = s
        .with_store(|st| st.vms())?
        .iter()
        .filter(|v| v["host_id"] == host && v["state"] != destroyed.as_str())
        .filter_map(|v| v["vm"].as_u64().and_then(|id| u32::try_from(id).ok()))
        .collect();
    let mut all: Vec<proto::VcpuBalance> = Vec::new();
    for vm in vms {
        match call_host(s, host, Command::ReadBalances { vm: Some(vm) }, None).await {
            Ok(Reply::Balances(b)) => all.extend(b.into_iter().filter(|b| b.vm == vm)),
            Ok(other) => {
                return Err(ApiError(
                    StatusCode::BAD_GATEWAY,
                    format!("host '{host}' answered the balances of VM {vm} with {other:?}"),
                ))
            }
            Err(ApiError(StatusCode::NOT_FOUND, _)) if s.link(host).is_some() => {}
            Err(e) => return Err(e),
        }
    }
    Ok(Json(json!({ "Balances": all })))
}

#[derive(Deserialize)]
struct Period {
    period_ms: u32,
}

async fn set_telemetry_period(
    State(s): St,
    p: Result<Path<String>, PathRejection>,
    b: Result<Json<Period>, JsonRejection>,
) -> ApiResult {
    let Path(host) = p?;
    let Json(b) = b?;
    reply_json(
        &call_host(
            &s,
            &host,
            Command::SetTelemetryPeriod {
                period_ms: b.period_ms,
            },
            None,
        )
        .await?,
    )
}

async fn pools(State(s): St) -> ApiResult {
    Ok(Json(json!({ "pools": s.with_store(|st| st.pools())? })))
}

async fn create_pool(State(s): St, b: Result<Json<PoolSpec>, JsonRejection>) -> ApiResult {
    let Json(spec) = b?;
    s.with_store(|st| st.create_pool(&spec, now_ms()))?;
    Ok(Json(
        serde_json::to_value(s.with_store(|st| st.pool(&spec.name))?).unwrap_or(Value::Null),
    ))
}

async fn pool(State(s): St, p: Result<Path<String>, PathRejection>) -> ApiResult {
    let Path(name) = p?;
    Ok(Json(
        serde_json::to_value(s.with_store(|st| st.pool(&name))?).unwrap_or(Value::Null),
    ))
}

#[derive(Deserialize)]
struct Purchase {
    amount_ns: u64,
}

async fn purchase(
    State(s): St,
    p: Result<Path<String>, PathRejection>,
    b: Result<Json<Purchase>, JsonRejection>,
) -> ApiResult {
    let Path(name) = p?;
    let Json(b) = b?;
    let cost = s.with_store(|st| st.purchase(&name, b.amount_ns, now_ms()))?;
    let pool = s.with_store(|st| st.pool(&name))?;
    Ok(Json(
        json!({ "cost_micros": cost, "balance_ns": pool.balance_ns }),
    ))
}

#[derive(Deserialize)]
struct Member {
    host: String,
    vm: u32,
}

async fn authorize(
    State(s): St,
    p: Result<Path<String>, PathRejection>,
    b: Result<Json<Member>, JsonRejection>,
) -> ApiResult {
    let Path(name) = p?;
    let Json(m) = b?;
    s.with_store(|st| st.authorize(&name, &m.host, m.vm, true))?;
    Ok(Json(
        json!({ "authorized": format!("{}/{}", m.host, m.vm), "pool": name }),
    ))
}

async fn deauthorize(
    State(s): St,
    p: Result<Path<String>, PathRejection>,
    b: Result<Json<Member>, JsonRejection>,
) -> ApiResult {
    let Path(name) = p?;
    let Json(m) = b?;
    s.with_store(|st| st.authorize(&name, &m.host, m.vm, false))?;
    Ok(Json(
        json!({ "deauthorized": format!("{}/{}", m.host, m.vm), "pool": name }),
    ))
}

async fn commitments(State(s): St) -> ApiResult {
    Ok(Json(
        json!({ "commitments": s.with_store(|st| st.commitments())? }),
    ))
}

#[derive(Deserialize)]
struct SetCommitment {
    host: String,
    vm: u32,
    volume: u16,
    committed_iops: u32,
    #[serde(default)]
    limit_iops: u32,
    #[serde(default)]
    auto_tier: bool,
}

async fn set_commitment(State(s): St, b: Result<Json<SetCommitment>, JsonRejection>) -> ApiResult {
    let Json(b) = b?;
    if b.limit_iops != 0 && b.limit_iops < b.committed_iops {
        return Err(bad(format!(
            "limit {} is below the commitment {}",
            b.limit_iops, b.committed_iops
        )));
    }
    let c = CommitmentView {
        host_id: b.host.clone(),
        vm: b.vm,
        volume: b.volume,
        committed_iops: b.committed_iops,
        limit_iops: b.limit_iops,
        auto_tier: b.auto_tier,
        status: "pending".into(),
        reason: String::new(),
    };
    if s.link(&b.host).is_none() {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("host '{}' is unknown or not connected", b.host),
        ));
    }
    s.with_store(|st| st.commitment_asked(&c, now_ms()))?;
    let cmd = Command::SetVolumeCommitment {
        vm: b.vm,
        volume: b.volume,
        committed_iops: b.committed_iops,
        limit_iops: b.limit_iops,
    };
    call_host(&s, &b.host, cmd, Some(c)).await?;
    let all = s.with_store(|st| st.commitments())?;
    let row = all
        .into_iter()
        .find(|x| x.host_id == b.host && x.vm == b.vm && x.volume == b.volume);
    Ok(Json(serde_json::to_value(row).unwrap_or(Value::Null)))
}

async fn usage(State(s): St) -> ApiResult {
    Ok(Json(json!({
        "pools": s.with_store(|st| st.pool_usage())?,
        "vms": s.with_store(|st| st.vm_usage())?,
    })))
}

async fn billing(State(s): St) -> ApiResult {
    let lines = s.with_store(|st| {
        st.billing(
            now_ms(),
            s.cfg.iops_month_micros,
            s.cfg.overage_iops_month_micros,
        )
    })?;
    Ok(Json(json!({
        "iops_month_micros": s.cfg.iops_month_micros,
        "overage_iops_month_micros": s.cfg.overage_iops_month_micros,
        "volumes": lines,
    })))
}

async fn telemetry(State(s): St) -> ApiResult {
    let t: Vec<Value> = s
        .telemetry
        .lock()
        .map(|m| {
            m.iter()
                .map(
                    |((h, _), e)| json!({ "host_id": h, "at_ms": e.at_ms, "snapshot": e.snapshot }),
                )
                .collect()
        })
        .unwrap_or_default();
    Ok(Json(json!({ "telemetry": t })))
}

async fn notifications(State(s): St) -> ApiResult {
    Ok(Json(
        json!({ "notifications": s.with_store(|st| st.notifications(100))? }),
    ))
}

async fn ledger(State(s): St) -> ApiResult {
    Ok(Json(
        serde_json::to_value(s.with_store(|st| st.ledger_check())?).unwrap_or(Value::Null),
    ))
}

async fn grants(State(s): St) -> ApiResult {
    Ok(Json(json!({ "grants": s.with_store(|st| st.grants())? })))
}

async fn metrics(State(s): St) -> Result<String, ApiError> {
    let mut out = String::new();
    let m = &s.metrics;
    let counters = [
        ("cv_frames_out_total", "Frames sent to hosts", &m.frames_out),
        (
            "cv_credit_requests_total",
            "Credit requests received",
            &m.credit_requests,
        ),
        ("cv_grants_sent_total", "Grants sent", &m.grants_sent),
        (
            "cv_grants_acked_total",
            "Grants acknowledged",
            &m.grants_acked,
        ),
        (
            "cv_grants_refunded_total",
            "Grants refunded",
            &m.grants_refunded,
        ),
        (
            "cv_credit_denials_total",
            "Credit requests denied",
            &m.denials,
        ),
        ("cv_command_retries_total", "Command re-sends", &m.retries),
        (
            "cv_stale_answers_total",
            "Stale answers from hosts",
            &m.stale,
        ),
        (
            "cv_reattaches_total",
            "Attaches re-sent because the host's Hello was lost",
            &m.reattaches,
        ),
        (
            "cv_telemetry_snapshots_total",
            "Telemetry snapshots",
            &m.telemetry,
        ),
        (
            "cv_command_errors_total",
            "API commands refused by hosts",
            &m.command_errors,
        ),
        (
            "cv_commands_answered_total",
            "Commands answered by hosts",
            &m.answered,
        ),
        (
            "cv_answered_command_sends_total",
            "Sends (first and re-sends) of the answered commands",
            &m.answered_sends,
        ),
        (
            "cv_answer_parts_total",
            "Parts of long answers received",
            &m.parts,
        ),
        (
            "cv_answer_parts_refused_total",
            "Parts of long answers refused",
            &m.parts_refused,
        ),
    ];
    for (name, help, v) in counters {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
            v.load(Ordering::Relaxed)
        );
    }
    let _ = writeln!(
        out,
        "# TYPE cv_host_connected gauge\n# TYPE cv_frames_rejected_total counter\n# TYPE cv_telemetry_gaps_total counter\n# TYPE cv_host_frames_rejected_total counter"
    );
    if let Ok(hosts) = s.hosts.lock() {
        for h in hosts.values() {
            let _ = writeln!(
                out,
                "cv_host_connected{{address=\"{}\"}} {}",
                h.address,
                u8::from(h.connected)
            );
            let _ = writeln!(
                out,
                "cv_frames_rejected_total{{address=\"{}\"}} {}",
                h.address,
                h.decode.rejected()
            );
            let _ = writeln!(
                out,
                "cv_telemetry_gaps_total{{address=\"{}\"}} {}",
                h.address, h.telemetry_gaps
            );
            if let Some(l) = &h.host_link {
                let _ = writeln!(
                    out,
                    "cv_host_frames_rejected_total{{address=\"{}\"}} {}",
                    h.address,
                    l.decode.rejected()
                );
            }
        }
    }
    let _ = writeln!(out, "# TYPE cv_pool_balance_ns gauge");
    for p in s.with_store(|st| st.pools())? {
        let _ = writeln!(
            out,
            "cv_pool_balance_ns{{pool=\"{}\"}} {}",
            p.spec.name, p.balance_ns
        );
    }
    let _ = writeln!(
        out,
        "# TYPE cv_vcpu_balance_ns gauge\n# TYPE cv_volume_iops gauge\n# TYPE cv_volume_committed_iops gauge"
    );
    if let Ok(t) = s.telemetry.lock() {
        for ((host, vm), e) in t.iter() {
            for c in &e.snapshot.vcpus {
                let _ = writeln!(
                    out,
                    "cv_vcpu_balance_ns{{host=\"{host}\",vm=\"{vm}\",vcpu=\"{}\"}} {}",
                    c.vcpu, c.balance_ns
                );
            }
            for v in &e.snapshot.volumes {
                let _ = writeln!(
                    out,
                    "cv_volume_iops{{host=\"{host}\",vm=\"{vm}\",volume=\"{}\"}} {}",
                    v.volume, v.iops
                );
                let _ = writeln!(
                    out,
                    "cv_volume_committed_iops{{host=\"{host}\",vm=\"{vm}\",volume=\"{}\"}} {}",
                    v.volume, v.committed_iops
                );
            }
        }
    }
    let l = s.with_store(|st| st.ledger_check())?;
    let _ = writeln!(
        out,
        "# TYPE cv_ledger_debited_ns counter\ncv_ledger_debited_ns {}\n# TYPE cv_ledger_applied_ns counter\n\
         cv_ledger_applied_ns {}\n# TYPE cv_ledger_in_flight_ns gauge\ncv_ledger_in_flight_ns {}",
        l.debited_ns, l.applied_ns, l.in_flight_ns
    );
    Ok(out)
}
