//! One message, three processes, one trace: ingress, worker and sender each export their
//! spans over OTLP (http/protobuf, to a collector stand-in that decodes OpenTelemetry's own
//! protobuf messages) under their `service.name`, all under the trace id ingress started; the
//! message on NATS carries it in its `traceparent` header; and each process's JSON log lines
//! about the message carry that `trace_id`. Without a collector, nothing is exported but the
//! ids are the same: one trace per message, in its `traceparent` and every role's logs.

use crate::support;

use std::{
    collections::BTreeSet,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{Router, body::Bytes, extract::State, routing::post};
use opentelemetry_proto::tonic::{
    collector::trace::v1::ExportTraceServiceRequest, common::v1::any_value::Value,
};
use prost::Message;
use support::{
    fake_twilio::FakeTwilio,
    harness::{Servers, Wagate, eventually, sid},
};

/// A span as the collector got it.
#[derive(Debug, Clone)]
struct Got {
    service: String,
    trace_id: String,
    name: String,
}

/// An OTLP/HTTP traces receiver: every span of every request, in arrival order.
async fn collector() -> (String, Arc<Mutex<Vec<Got>>>) {
    let spans = Arc::new(Mutex::new(Vec::new()));
    async fn receive(State(spans): State<Arc<Mutex<Vec<Got>>>>, body: Bytes) -> &'static str {
        let request = ExportTraceServiceRequest::decode(body).expect("an OTLP protobuf request");
        let mut got = spans.lock().unwrap();
        for resource in request.resource_spans {
            let service = resource
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|a| a.key == "service.name")
                .and_then(|a| a.value.as_ref()?.value.as_ref())
                .map(|v| match v {
                    Value::StringValue(s) => s.clone(),
                    other => format!("{other:?}"),
                })
                .unwrap_or_default();
            for scope in resource.scope_spans {
                for span in scope.spans {
                    got.push(Got {
                        service: service.clone(),
                        trace_id: hex::encode(&span.trace_id),
                        name: span.name,
                    });
                }
            }
        }
        ""
    }
    let app = Router::new()
        .route("/v1/traces", post(receive))
        .with_state(spans.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, spans)
}

/// The JSON log lines of `logs` that carry `trace_id` (every line must be one JSON object).
fn lines_of_trace(logs: &str, trace_id: &str) -> Vec<serde_json::Value> {
    logs.lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {l}"))
        })
        .filter(|v| v["trace_id"] == trace_id)
        .collect()
}

/// NATS, Redis, a fake Twilio and the three roles, with JSON logs at debug for wagate's crates.
struct Traced {
    /// Kept for the test's length: dropping them stops NATS and Redis.
    _servers: Servers,
    twilio: FakeTwilio,
    /// Ingress (serving the echo agent `demo`), worker and sender.
    roles: [Wagate; 3],
    /// What ingress publishes on NATS.
    published: async_nats::Subscriber,
}

impl Traced {
    /// Starts it all, with `extra` in the roles' environment.
    async fn deploy(extra: &[(&str, &str)]) -> Self {
        let servers = Servers::start().await;
        let twilio = FakeTwilio::start().await;
        twilio.add_account(support::harness::ACCOUNT_SID, support::harness::AUTH_TOKEN);
        let mut env = vec![
            ("WAGATE_LOG_FORMAT", "json"),
            (
                "RUST_LOG",
                "info,wagate_ingress=debug,wagate_worker=debug,wagate_sender=debug,async_nats=warn",
            ),
        ];
        env.extend_from_slice(extra);
        let ingress = Wagate::start_role("ingress", &servers, &twilio.base_url, &env).await;
        ingress.echo_agent("demo").await;
        let worker = Wagate::start_role("worker", &servers, &twilio.base_url, &env).await;
        let sender = Wagate::start_role("sender", &servers, &twilio.base_url, &env).await;
        let nats = async_nats::connect(&servers.nats_url).await.unwrap();
        let published = nats.subscribe("wagate.inbound.>").await.unwrap();
        Traced {
            _servers: servers,
            twilio,
            roles: [ingress, worker, sender],
            published,
        }
    }
}

#[tokio::test]
async fn one_message_is_one_trace_across_ingress_worker_and_sender() {
    let (endpoint, spans) = collector().await;
    // JetStream's messages carry the traceparent as a header too, for tools that follow traces
    // through NATS: `published` sees what ingress published.
    let Traced {
        twilio,
        roles,
        mut published,
        _servers,
    } = Traced::deploy(&[
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
    ])
    .await;
    let [ingress, ..] = &roles;
    let message_sid = sid(1);
    let answer = ingress
        .inbound("demo", &message_sid, "+14155550100", "trace me")
        .await;
    assert_eq!(answer.status(), 200);
    twilio.wait_for_sent(1, Duration::from_secs(20)).await;

    // The trace of the webhook's span, and the services that sent spans in it.
    let (trace_id, services) = eventually(
        Duration::from_secs(20),
        "spans of ingress, worker and sender under one trace",
        || async {
            let got = spans.lock().unwrap().clone();
            let root = got
                .iter()
                .find(|s| s.name == "inbound_webhook" && s.service == "wagate-ingress")?;
            let in_trace: BTreeSet<(String, String)> = got
                .iter()
                .filter(|s| s.trace_id == root.trace_id)
                .map(|s| (s.service.clone(), s.name.clone()))
                .collect();
            let services: BTreeSet<&str> = in_trace.iter().map(|(s, _)| s.as_str()).collect();
            (services.len() == 3).then(|| (root.trace_id.clone(), in_trace))
        },
    )
    .await;
    assert!(
        services.contains(&("wagate-worker".into(), "turn".into()))
            && services.contains(&("wagate-sender".into(), "send".into())),
        "{services:?}"
    );
    assert_ne!(trace_id, "0".repeat(32));
    let header = next_traceparent(&mut published).await;
    assert_eq!(
        header.split('-').nth(1),
        Some(trace_id.as_str()),
        "{header}"
    );

    assert_logged_under(&roles, &message_sid, &trace_id);
}

/// Without a collector, spans are not exported but messages are still traced: each message's
/// `traceparent` on NATS names a trace of its own, and the JSON log lines of every role about
/// that message carry its id.
#[tokio::test]
async fn without_a_collector_each_message_still_has_one_trace_id_in_every_roles_logs() {
    let Traced {
        twilio,
        roles,
        mut published,
        _servers,
    } = Traced::deploy(&[]).await;
    let [ingress, _, sender] = &roles;

    let mut traces = Vec::new();
    for (n, from) in [(1, "+14155550100"), (2, "+14155550101")] {
        let message_sid = sid(n);
        let answer = ingress
            .inbound("demo", &message_sid, from, "trace me")
            .await;
        assert_eq!(answer.status(), 200);
        twilio
            .wait_for_sent(n as usize, Duration::from_secs(20))
            .await;
        let header = next_traceparent(&mut published).await;
        let trace_id = header.split('-').nth(1).expect("a trace id").to_owned();
        assert_eq!(trace_id.len(), 32, "{header}");
        assert_ne!(trace_id, "0".repeat(32));
        traces.push((message_sid, trace_id));
    }
    assert_ne!(traces[0].1, traces[1].1, "two messages, two traces");

    // The sender logs a message's send when it has sent it, which may be after Twilio got it.
    for (message_sid, trace_id) in &traces {
        eventually(
            Duration::from_secs(10),
            "the sender's log lines of the message",
            || async { (!lines_of_trace(&sender.logs(), trace_id).is_empty()).then_some(()) },
        )
        .await;
        assert_logged_under(&roles, message_sid, trace_id);
    }
}

/// The `traceparent` header of the next message ingress published on NATS.
async fn next_traceparent(published: &mut async_nats::Subscriber) -> String {
    let on_nats = tokio::time::timeout(Duration::from_secs(5), futures::StreamExt::next(published))
        .await
        .expect("ingress's publish seen on NATS")
        .expect("a message");
    on_nats
        .headers
        .as_ref()
        .and_then(|h| h.get("traceparent"))
        .map(|v| v.as_str().to_owned())
        .expect("a traceparent header")
}

/// Each of `processes` (ingress, worker and sender, in that order) logged about the message
/// `message_sid` with `trace_id`, and its lines that name the message or its reply all carry it.
fn assert_logged_under(processes: &[Wagate; 3], message_sid: &str, trace_id: &str) {
    for (role, process) in ["ingress", "worker", "sender"].into_iter().zip(processes) {
        let logs = process.logs();
        let traced = lines_of_trace(&logs, trace_id);
        assert!(
            !traced.is_empty(),
            "{role}: no log line with trace_id {trace_id}:\n{logs}"
        );
        for line in logs.lines().filter(|l| l.contains(&message_sid[2..])) {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            assert_eq!(v["trace_id"], trace_id, "{role}: {line}");
        }
    }
}
