use crate::support;

// `GET /v1/openapi.json` of a running `wagate serve`: an OpenAPI 3.1 document behind the admin
// token, and one that matches the router. The router and the description are made together
// from the handlers (ingress/src/admin/mod.rs, `api`), so no list of routes is written here:
// every path and method the description names is called and must reach its handler (not the
// router's 404 fallback, not its 405), and every other method on those paths must be the
// router's 405, so the description leaves no method out either.

use reqwest::Method;
use serde_json::Value;
use support::harness::World;

/// Every method a route could take.
const METHODS: [Method; 5] = [
    Method::GET,
    Method::PUT,
    Method::POST,
    Method::DELETE,
    Method::PATCH,
];

/// What the router's fallback says for a path it does not serve.
const NO_ROUTE: &str = "no such endpoint";

async fn description(w: &World) -> Value {
    let r = w
        .wagate
        .admin(Method::GET, "/v1/openapi.json")
        .send()
        .await
        .expect("GET /v1/openapi.json");
    assert_eq!(r.status(), 200);
    let content_type = r
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    assert!(
        content_type.starts_with("application/json"),
        "{content_type}"
    );
    r.json().await.expect("the description is JSON")
}

/// `path` with each `{parameter}` filled in: an agent and a sid that do not exist, a valid
/// number, so that every handler answers without changing anything.
fn filled(path: &str) -> String {
    path.replace("{agent_id}", "nobody-here")
        .replace("{phone}", "%2B14155550100")
        .replace("{sid}", "SM00000000000000000000000000000000")
        .replace("{id}", "0")
}

#[tokio::test]
async fn the_description_is_openapi_3_1_behind_the_admin_token() {
    let w = World::start().await;
    let url = format!("{}/v1/openapi.json", w.wagate.admin_url);
    let r = w.wagate.http.get(&url).send().await.expect("GET");
    assert_eq!(r.status(), 401, "without the token");
    let body: Value = r.json().await.expect("a JSON error");
    assert!(body["error"].is_string(), "{body}");

    let doc = description(&w).await;
    assert!(
        doc["openapi"]
            .as_str()
            .is_some_and(|v| v.starts_with("3.1.")),
        "{}",
        doc["openapi"]
    );
    let scheme = &doc["components"]["securitySchemes"]["bearer"];
    assert_eq!(scheme["type"], "http", "{scheme}");
    assert_eq!(scheme["scheme"], "bearer", "{scheme}");
    assert_eq!(doc["security"], serde_json::json!([{"bearer": []}]));
    let paths = doc["paths"].as_object().expect("paths");
    assert!(
        paths.contains_key("/v1/openapi.json"),
        "it describes itself"
    );
    for (path, item) in paths {
        for (method, op) in item.as_object().expect("a path item") {
            let responses = op["responses"].as_object().expect("responses");
            assert!(
                responses.contains_key("401"),
                "{method} {path} does not say that it needs the token"
            );
            for (status, response) in responses {
                let code: u16 = status.parse().expect("a status");
                if code >= 400 {
                    assert_eq!(
                        response["content"]["application/json"]["schema"]["$ref"],
                        "#/components/schemas/ErrorBody",
                        "{method} {path} {status}"
                    );
                }
            }
        }
    }
}

#[tokio::test]
async fn every_described_route_is_served_and_every_served_method_described() {
    let w = World::start().await;
    let doc = description(&w).await;
    let paths = doc["paths"].as_object().expect("paths");
    let mut problems = Vec::new();
    let mut called = 0;
    for (path, item) in paths {
        let described = item.as_object().expect("a path item");
        let url = filled(path);
        for method in METHODS {
            let r = w
                .wagate
                .admin(method.clone(), &url)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body("{}")
                .send()
                .await
                .expect("an answer");
            let status = r.status().as_u16();
            let body: Value = r.json().await.unwrap_or(Value::Null);
            let routed = status != 405 && !(status == 404 && body["error"] == NO_ROUTE);
            let is_described = described.contains_key(&method.as_str().to_ascii_lowercase());
            called += 1;
            if is_described && !routed {
                problems.push(format!(
                    "{method} {path} is described but not served: {status} {body}"
                ));
            }
            if !is_described && status != 405 {
                problems.push(format!(
                    "{method} {path} is served ({status} {body}) but not described"
                ));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    assert!(
        paths.len() > 1,
        "{called} calls: the description has no routes"
    );
}
