//! `GET /schedules`: the periodic tasks, where each got to, and which replica fires them.

use actix_web::{web, HttpResponse};
use serde::Serialize;
use utoipa::ToSchema;

use crate::domain::epoch_millis;
use crate::domain::schedule::Missed;
use crate::http::error::Problem;
use crate::http::{ApiError, AppState};

/// A periodic task.
#[derive(Debug, Serialize, ToSchema)]
pub struct ScheduleInfo {
    pub name: String,
    pub task: String,
    /// `every 60 s`, or `cron "0 2 * * *" at +01:00`.
    pub when: String,
    pub route: String,
    /// `catch_up_one` or `skip`.
    pub missed: String,
    /// The last slot fired (or counted from), RFC 3339.
    pub last_slot: Option<String>,
    /// The next slot, RFC 3339.
    pub next_slot: Option<String>,
}

/// The schedules and their leader.
#[derive(Debug, Serialize, ToSchema)]
pub struct Schedules {
    pub schedules: Vec<ScheduleInfo>,
    /// The replica holding the lead (`host:pid:…`), while its lease is live.
    pub leader: Option<String>,
    /// Whether the replica answering is the leader.
    pub this_replica_leads: bool,
    /// The answering replica's name in the lease, if it competes for it (`KOBE_BEAT`).
    pub this_replica: Option<String>,
}

fn rfc3339(ms: i64) -> Option<String> {
    super::status::timestamp(Some(mongodb::bson::DateTime::from_millis(ms)))
}

/// The periodic tasks declared (`[[schedule]]` in `KOBE_TASKS_FILE`).
#[utoipa::path(
    get,
    path = "/schedules",
    tag = "tasks",
    responses(
        (status = 200, description = "Schedules and their leader", body = Schedules),
        (status = 401, description = "Missing or wrong bearer token (with KOBE_API_TOKENS set)", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "Over the rate limit (with KOBE_RATE_LIMIT set); see Retry-After", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "MongoDB unavailable", body = Problem, content_type = "application/problem+json"),
    ),
    security((), ("bearer" = [])),
)]
pub async fn list(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok().json(schedules(&state).await?))
}

/// What `/schedules` and the operator page show.
pub async fn schedules(state: &AppState) -> Result<Schedules, ApiError> {
    let (reached, leader) = if state.schedules.is_empty() {
        (Vec::new(), None)
    } else {
        let reached = state.leaders.last_slots().await.map_err(ApiError::store)?;
        let leader = state
            .leaders
            .leader(crate::beat::ROLE)
            .await
            .map_err(ApiError::store)?
            .filter(|l| l.until.timestamp_millis() > epoch_millis())
            .map(|l| l.holder);
        (reached, leader)
    };
    let topology = state.submitter.topology();
    let now = epoch_millis();
    let schedules = state
        .schedules
        .iter()
        .map(|s| {
            let last = reached
                .iter()
                .find(|(name, _)| *name == s.name)
                .map(|(_, slot)| *slot);
            ScheduleInfo {
                name: s.name.clone(),
                task: s.fires().to_owned(),
                when: s.when.to_string(),
                route: crate::beat::route(s, topology),
                missed: match s.missed {
                    Missed::CatchUpOne => "catch_up_one".into(),
                    Missed::Skip => "skip".into(),
                },
                last_slot: last.and_then(rfc3339),
                next_slot: s.next_slot(last.unwrap_or(now).max(now)).and_then(rfc3339),
            }
        })
        .collect();
    Ok(Schedules {
        schedules,
        this_replica_leads: leader.is_some() && leader == state.beat_holder,
        leader,
        this_replica: state.beat_holder.clone(),
    })
}
