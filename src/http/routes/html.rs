//! What every server-rendered page shares: escaping, times, the page around a body (its style,
//! its one script, the CSRF token of a signed-in session).

use actix_web::{HttpRequest, HttpResponse};
use mongodb::bson::DateTime;

/// HTML-escapes text for an element or a quoted attribute.
pub(crate) fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

pub(crate) fn when(t: Option<DateTime>) -> String {
    super::status::timestamp(t).unwrap_or_else(|| "-".into())
}

const STYLE: &str = "body{font:14px system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left;vertical-align:top}th{background:#f4f4f4}.FAILURE{color:#b00}.SUCCESS{color:#070}.REVOKED{color:#777}code{font-size:90%}";

/// Posts a retry, a cancel, a replay or a sign-out and reloads. Behind `KOBE_API_TOKENS` the
/// request carries the session cookie `/ui/login` set and the session's CSRF token (from the
/// page's `kobe-csrf` meta tag), which a page of another origin cannot read.
const SCRIPT: &str = "document.addEventListener('click',async e=>{const d=e.target.dataset;const m=document.querySelector('meta[name=kobe-csrf]');const h={'x-kobe-csrf':m?m.content:''};let r;if(d.retry||d.cancel){r=await fetch('/task/'+encodeURIComponent(d.retry||d.cancel)+(d.retry?'/retry':'/cancel'),{method:'POST',headers:h})}else if(d.replay){r=await fetch('/dlq/replay',{method:'POST',headers:Object.assign({'content-type':'application/json'},h),body:JSON.stringify({task_ids:[d.replay]})})}else if(d.signout!==undefined){await fetch('/ui/logout',{method:'POST',headers:h});location.href='/ui/login';return}else return;e.target.textContent=r.ok?'done':'refused ('+r.status+')';setTimeout(()=>location.reload(),800)});";

/// A page; `csrf`: the signed-in session's token (the page then offers to sign out).
pub(crate) fn page(title: &str, refresh: bool, body: &str, csrf: Option<&str>) -> HttpResponse {
    let refresh = if refresh {
        "<meta http-equiv=\"refresh\" content=\"10\">"
    } else {
        ""
    };
    let (meta, sign_out) = match csrf {
        Some(csrf) => (
            format!("<meta name=\"kobe-csrf\" content=\"{}\">", escape(csrf)),
            "<p><button data-signout>sign out</button></p>",
        ),
        None => (String::new(), ""),
    };
    HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .insert_header(("Cache-Control", "no-store"))
        .body(format!(
            "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">{refresh}{meta}<title>{}</title><style>{STYLE}</style></head><body>{body}{sign_out}<script>{SCRIPT}</script></body></html>",
            escape(title)
        ))
}

/// The CSRF token of the request's page session, if it came with one.
pub(crate) fn csrf_of(request: &HttpRequest) -> Option<String> {
    use actix_web::HttpMessage;
    request
        .extensions()
        .get::<crate::http::guard::Caller>()
        .and_then(|caller| caller.csrf.clone())
}
