//! `/ui`: one page for operators, rendered on the server with no external assets — queue depths
//! and consumers per route, what happened in the last hour, the latest failures with a retry
//! button, and a task's detail (`/ui/task/{id}`) with its failed attempts and replays, with cancel
//! and retry buttons. It sits behind the same bearer tokens as `/task*`: a browser signs in once
//! at `/ui/login` with a token and gets a session ([`crate::http::session`]).

use std::fmt::Write as _;
use std::time::Duration;

use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;

use super::html::{csrf_of, escape, page, when};
use crate::domain::TaskState;
use crate::http::{ApiError, AppState};
use crate::operate::overview::Overview;

/// The sign-in form's field.
#[derive(Debug, Deserialize)]
pub struct SignIn {
    pub token: String,
}

const SIGN_IN_FORM: &str = "<h1>Kobe</h1><form method=\"post\" action=\"/ui/login\"><label>API token <input type=\"password\" name=\"token\" autocomplete=\"current-password\" autofocus></label> <button>sign in</button></form>";

/// Sign-in tries one address may make per minute.
const SIGN_IN_TRIES: u32 = 10;

/// `GET /ui/login`: the sign-in form (straight to `/ui` when no tokens are configured).
pub(crate) async fn login_form(state: web::Data<AppState>) -> HttpResponse {
    if state.api_tokens.expose().is_empty() {
        return HttpResponse::SeeOther()
            .insert_header(("Location", "/ui"))
            .finish();
    }
    page("Kobe: sign in", false, SIGN_IN_FORM, None)
}

fn sign_in_page(status: actix_web::http::StatusCode, why: &str) -> HttpResponse {
    let mut response = page(
        "Kobe: sign in",
        false,
        &format!("<p id=\"refused\">{}</p>{SIGN_IN_FORM}", escape(why)),
        None,
    );
    *response.status_mut() = status;
    response
}

/// `POST /ui/login`: a listed token opens a session (8 h, kept in Redis; the cookie holds only
/// its random id) and goes to `/ui`; any other answers 401 with the form again. Tries are
/// limited per address. The token is never logged nor stored.
pub async fn login(
    request: HttpRequest,
    state: web::Data<AppState>,
    form: web::Form<SignIn>,
) -> HttpResponse {
    use actix_web::http::StatusCode;
    let token = form.token.trim();
    let tokens = state.api_tokens.expose();
    if tokens.is_empty() {
        return HttpResponse::SeeOther()
            .insert_header(("Location", "/ui"))
            .finish();
    }
    let address = crate::http::guard::client_address(&request, &state.trusted_proxies);
    match state
        .cache
        .over_rate_limit(
            &format!("login:{address}"),
            SIGN_IN_TRIES,
            Duration::from_secs(60),
            1,
        )
        .await
    {
        Ok(Some(retry_after)) => {
            tracing::warn!(address = %address, "sign-in tries over the limit");
            let mut response = sign_in_page(
                StatusCode::TOO_MANY_REQUESTS,
                "Too many sign-in tries from this address; wait a minute.",
            );
            response.headers_mut().insert(
                actix_web::http::header::RETRY_AFTER,
                retry_after.as_secs().max(1).into(),
            );
            return response;
        }
        Ok(None) => {}
        Err(error) => tracing::warn!(error = %error, "sign-in rate limit unavailable"),
    }
    if !crate::http::guard::token_matches(token, tokens) {
        tracing::warn!(address = %address, "sign-in refused");
        return sign_in_page(StatusCode::UNAUTHORIZED, "That token is not accepted.");
    }
    let by = crate::http::guard::requester_of(Some(token));
    match crate::http::session::open(&state.cache, token, by.clone()).await {
        Ok(id) => {
            tracing::info!(by = %by, "operator signed in to /ui");
            HttpResponse::SeeOther()
                .insert_header(("Location", "/ui"))
                .insert_header((
                    "Set-Cookie",
                    crate::http::session::cookie(
                        Some(&id),
                        crate::http::session::over_tls(&request),
                    ),
                ))
                .finish()
        }
        Err(error) => {
            tracing::warn!(error = %error, "cannot open a session");
            sign_in_page(
                StatusCode::SERVICE_UNAVAILABLE,
                "Sessions are kept in Redis, which does not answer; try again shortly.",
            )
        }
    }
}

/// `POST /ui/logout`: ends the page session and clears its cookie.
pub async fn logout(request: HttpRequest, state: web::Data<AppState>) -> HttpResponse {
    if let Some(id) = crate::http::session::id_in(request.headers()) {
        if let Err(error) = crate::http::session::close(&state.cache, &id).await {
            tracing::warn!(error = %error, "cannot end the session; it expires on its own");
        }
    }
    HttpResponse::SeeOther()
        .insert_header(("Location", "/ui/login"))
        .insert_header((
            "Set-Cookie",
            crate::http::session::cookie(None, crate::http::session::over_tls(&request)),
        ))
        .finish()
}

/// `?id=` of the search box.
#[derive(Debug, Deserialize)]
pub(crate) struct Find {
    pub id: Option<String>,
}

/// The overview: queues, the last hour, the latest failures, a task search box.
pub(crate) async fn overview(
    request: HttpRequest,
    state: web::Data<AppState>,
    find: web::Query<Find>,
) -> Result<HttpResponse, ApiError> {
    if let Some(id) = find
        .id
        .as_deref()
        .map(str::trim)
        .filter(|id| !id.is_empty())
    {
        return Ok(HttpResponse::SeeOther()
            .insert_header((
                "Location",
                format!(
                    "/ui/task/{}",
                    percent_encoding::utf8_percent_encode(id, percent_encoding::NON_ALPHANUMERIC)
                ),
            ))
            .finish());
    }
    let overview = state.operations.overview().await.map_err(ApiError::store)?;
    let mut body = String::from("<h1>Kobe</h1>");
    body.push_str("<form action=\"/ui\" method=\"get\"><input name=\"id\" size=\"40\" placeholder=\"task id\"> <button>find</button></form>");
    queues_panel(&mut body, &overview);
    last_hour_panel(&mut body, &overview);
    failures_panel(&mut body, &overview);
    dead_letters_panel(&mut body, &overview);
    super::workflow_page::workflows_panel(&mut body, &overview);
    if !state.schedules.is_empty() {
        schedules_panel(&mut body, &super::schedules::schedules(&state).await?);
    }
    body.push_str("<p><a href=\"/docs\">API</a> · <a href=\"/metrics\">metrics</a></p>");
    Ok(page("Kobe", true, &body, csrf_of(&request).as_deref()))
}

/// Queues, from the broker (a broker that did not answer costs one line).
fn queues_panel(body: &mut String, overview: &Overview) {
    body.push_str("<h2>Queues</h2>");
    match &overview.queues {
        Ok(reports) => {
            body.push_str("<table id=\"queues\"><tr><th>queue</th><th>ready messages</th><th>consumers</th></tr>");
            for q in reports {
                let _ = write!(
                    body,
                    "<tr data-queue=\"{0}\"><td>{0}</td><td class=\"messages\">{1}</td><td class=\"consumers\">{2}</td></tr>",
                    escape(&q.name),
                    q.messages,
                    q.consumers
                );
            }
            body.push_str("</table>");
        }
        Err(e) => {
            let _ = write!(
                body,
                "<p id=\"queues\">RabbitMQ unavailable: {}</p>",
                escape(e)
            );
        }
    }
}

/// Tasks per state in the last hour, throughput and failure rate.
fn last_hour_panel(body: &mut String, overview: &Overview) {
    body.push_str("<h2>Last hour</h2><table id=\"counts\"><tr>");
    for (s, _) in &overview.last_hour {
        let _ = write!(body, "<th>{s}</th>");
    }
    body.push_str("<th>finished per minute</th><th>failure rate</th></tr><tr>");
    for (s, n) in &overview.last_hour {
        let _ = write!(body, "<td data-state=\"{s}\">{n}</td>");
    }
    let rate = overview
        .failure_rate()
        .map_or_else(|| "-".to_owned(), |rate| format!("{rate:.1} %"));
    let _ = write!(
        body,
        "<td id=\"throughput\">{:.1}</td><td id=\"failure-rate\">{rate}</td></tr></table>",
        overview.finished_per_minute()
    );
}

/// The latest failures, each with a retry button.
fn failures_panel(body: &mut String, overview: &Overview) {
    body.push_str("<h2>Latest failures</h2><table id=\"failures\"><tr><th>task</th><th>name</th><th>attempts</th><th>when</th><th>root cause</th><th></th></tr>");
    for task in &overview.failures {
        let id = escape(&task.id);
        let _ = write!(
            body,
            "<tr data-task=\"{id}\"><td><a href=\"/ui/task/{id}\"><code>{id}</code></a></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td><button data-retry=\"{id}\">retry</button></td></tr>",
            escape(&task.task_name),
            task.retries + 1,
            when(Some(task.updated_at)),
            escape(task.root_cause.as_deref().unwrap_or(""))
        );
    }
    body.push_str("</table>");
}

/// The oldest dead letters, each naming a task with a replay button.
fn dead_letters_panel(body: &mut String, overview: &Overview) {
    body.push_str("<h2>Dead letters</h2>");
    match &overview.dead_letters {
        Ok(letters) => {
            body.push_str("<table id=\"dead-letters\"><tr><th>task</th><th>name</th><th>attempts</th><th>reason</th><th></th></tr>");
            for letter in letters {
                let id = escape(letter.task_id.as_deref().unwrap_or("-"));
                let button = match &letter.task_id {
                    Some(_) => format!("<button data-replay=\"{id}\">replay</button>"),
                    None => String::new(),
                };
                let _ = write!(
                    body,
                    "<tr data-letter=\"{id}\"><td><code>{id}</code></td><td>{}</td><td>{}</td><td>{}</td><td>{button}</td></tr>",
                    escape(letter.task_name.as_deref().unwrap_or("-")),
                    letter.attempts.map_or("-".into(), |n| n.to_string()),
                    escape(&letter.reason)
                );
            }
            body.push_str("</table>");
        }
        Err(e) => {
            let _ = write!(
                body,
                "<p id=\"dead-letters\">cannot read the dead-letter queue: {}</p>",
                escape(e)
            );
        }
    }
}

/// The periodic tasks and which replica fires them.
fn schedules_panel(body: &mut String, schedules: &super::schedules::Schedules) {
    let _ = write!(
        body,
        "<h2>Schedules</h2><p id=\"leader\">fired by {}</p><table id=\"schedules\"><tr><th>name</th><th>task</th><th>when</th><th>route</th><th>last slot</th><th>next slot</th></tr>",
        escape(schedules.leader.as_deref().unwrap_or("no replica (none holds the lead)"))
    );
    for s in &schedules.schedules {
        let _ = write!(
            body,
            "<tr data-schedule=\"{}\"><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            escape(&s.name),
            escape(&s.name),
            escape(&s.task),
            escape(&s.when),
            escape(&s.route),
            s.last_slot.as_deref().unwrap_or("-"),
            s.next_slot.as_deref().unwrap_or("-"),
        );
    }
    body.push_str("</table>");
}

/// One task: its fields, failed attempts and replays, with a retry button when it failed.
pub async fn task(
    request: HttpRequest,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let not_found = || ApiError::no_task(&id);
    let task_id = ApiError::task_id(&id)?;
    let task = state
        .tasks
        .get(task_id.as_str())
        .await
        .map_err(ApiError::store)?
        .ok_or_else(not_found)?;
    let errors = state
        .errors
        .for_task(task_id.as_str())
        .await
        .map_err(ApiError::store)?;
    let id = escape(&task.id);
    let mut body = format!(
        "<p><a href=\"/ui\">← Kobe</a></p><h1><code>{id}</code></h1><table id=\"task\">\
         <tr><th>name</th><td>{name}</td></tr>\
         <tr><th>state</th><td class=\"{state}\" id=\"state\">{state}</td></tr>\
         <tr><th>retries</th><td>{retries}</td></tr><tr><th>route</th><td>{route}</td></tr>\
         <tr><th>created</th><td>{created}</td></tr><tr><th>started</th><td>{started}</td></tr>\
         <tr><th>finished</th><td>{finished}</td></tr><tr><th>root cause</th><td>{cause}</td></tr></table>",
        name = escape(&task.task_name),
        state = task.state,
        retries = task.retries,
        route = escape(&task.route),
        created = when(Some(task.created_at)),
        started = when(task.started_at),
        finished = when(task.finished_at),
        cause = escape(task.root_cause.as_deref().unwrap_or("-")),
    );
    if TaskState::RERUNNABLE.contains(&task.state) {
        let _ = write!(body, "<p><button data-retry=\"{id}\">retry</button></p>");
    } else if !task.state.is_final() {
        let _ = write!(body, "<p><button data-cancel=\"{id}\">cancel</button></p>");
    }
    body.push_str("<h2>Attempts</h2><table id=\"attempts\"><tr><th>attempt</th><th>worker</th><th>started</th><th>ended</th><th>outcome</th><th>root cause</th></tr>");
    for a in crate::store::error_log::history(&task, &errors) {
        let _ = write!(
            body,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"{}\">{}</td><td>{}</td></tr>",
            a.attempt,
            escape(a.worker.as_deref().unwrap_or("-")),
            when(a.started_at),
            when(a.ended_at),
            a.outcome,
            a.outcome,
            escape(a.root_cause.as_deref().unwrap_or("-"))
        );
    }
    body.push_str(
        "</table><h2>Replays</h2><table id=\"replays\"><tr><th>when</th><th>by</th></tr>",
    );
    for r in &task.replays {
        let _ = write!(
            body,
            "<tr><td>{}</td><td>{}</td></tr>",
            when(Some(r.at)),
            escape(&r.by)
        );
    }
    body.push_str("</table>");
    Ok(page(
        &format!("Kobe task {}", task.id),
        false,
        &body,
        csrf_of(&request).as_deref(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_escaped() {
        assert_eq!(
            escape("<script>\"a\" & 'b'</script>"),
            "&lt;script&gt;&quot;a&quot; &amp; &#39;b&#39;&lt;/script&gt;"
        );
    }
}
