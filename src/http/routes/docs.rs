//! `/openapi.json` and `/docs`: the OpenAPI document and Swagger UI, whose assets are compiled
//! into the binary so the page works without internet access.

use actix_web::{web, HttpResponse};

use crate::http::ApiError;

const BUNDLE: &str = include_str!("../assets/swagger-ui/swagger-ui-bundle.js");
const CSS: &str = include_str!("../assets/swagger-ui/swagger-ui.css");

const PAGE: &str = r##"<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>Kobe API</title>
  <link rel="stylesheet" href="/docs/swagger-ui.css">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="/docs/swagger-ui-bundle.js"></script>
  <script>
    window.ui = SwaggerUIBundle({ url: "/openapi.json", dom_id: "#swagger-ui" });
  </script>
</body>
</html>
"##;

pub async fn openapi(state: Option<web::Data<crate::http::AppState>>) -> HttpResponse {
    let bulk_max = state.map_or(1_000, |state| state.bulk_max);
    HttpResponse::Ok().json(crate::http::openapi::document(bulk_max))
}

pub async fn page() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .body(PAGE)
}

pub async fn asset(name: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let (body, content_type) = match name.as_str() {
        "swagger-ui-bundle.js" => (BUNDLE, "application/javascript; charset=utf-8"),
        "swagger-ui.css" => (CSS, "text/css; charset=utf-8"),
        other => return Err(ApiError::NotFound(format!("no docs asset `{other}`"))),
    };
    Ok(HttpResponse::Ok()
        .content_type(content_type)
        .insert_header(("Cache-Control", "public, max-age=86400"))
        .body(body))
}
