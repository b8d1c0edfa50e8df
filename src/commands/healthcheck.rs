//! `kobe healthcheck`: one line per dependency, exit 0 only when all hold. Every check is bounded,
//! so the command answers within its budget even when a dependency does not answer at all.

use std::time::Duration;

use crate::config::Settings;
use crate::store::{self, migrations, Cache};

/// The result of one check.
pub struct Check {
    pub name: &'static str,
    pub outcome: Result<String, String>,
}

/// Runs every check concurrently; each gets `settings.dependency_timeout` (capped so the whole
/// command stays under 10 s).
pub async fn checks(settings: &Settings) -> Vec<Check> {
    let budget = settings.dependency_timeout.min(Duration::from_secs(8));
    let (rabbitmq, mongodb, redis) = tokio::join!(
        bounded(budget, rabbitmq(settings, budget)),
        bounded(budget, mongodb(settings, budget)),
        bounded(budget, redis(settings, budget)),
    );
    vec![
        Check {
            name: "rabbitmq",
            outcome: rabbitmq,
        },
        Check {
            name: "mongodb",
            outcome: mongodb,
        },
        Check {
            name: "redis",
            outcome: redis,
        },
    ]
}

/// Prints the checks; refused when one failed.
pub async fn run(settings: &Settings) -> anyhow::Result<super::Ended> {
    let mut healthy = true;
    for check in checks(settings).await {
        match check.outcome {
            Ok(detail) => println!("ok    {:<8} {detail}", check.name),
            Err(reason) => {
                healthy = false;
                println!("FAIL  {:<8} {reason}", check.name);
            }
        }
    }
    Ok(healthy.into())
}

async fn bounded(
    budget: Duration,
    check: impl std::future::Future<Output = Result<String, String>>,
) -> Result<String, String> {
    // A little more than the budget: the check's own timeouts should fire first and say more.
    tokio::time::timeout(budget + Duration::from_millis(500), check)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {budget:?}")))
}

async fn rabbitmq(settings: &Settings, budget: Duration) -> Result<String, String> {
    let url = settings.broker.url.clone();
    let topology = super::topology(settings);
    // amiquip blocks: run it on the blocking pool, and let `bounded` give up on it if need be.
    // A cluster's nodes get a share of the budget each, after the topology check.
    let nodes_url = url.clone();
    let nodes = tokio::task::spawn_blocking(move || {
        let count = crate::amqp::node_addresses(&nodes_url).len().max(1);
        let per_node = budget / 2 / count as u32;
        crate::amqp::node_reports(&nodes_url, per_node)
    });
    let reports =
        tokio::task::spawn_blocking(move || crate::amqp::check_topology(&url, &topology, budget))
            .await
            .map_err(|e| format!("check panicked: {e}"))?
            .map_err(|e| e.to_string())?;
    let nodes = nodes.await.unwrap_or_default();
    // One node down in a cluster is worth a line, not a failure: Kobe runs on the others.
    let nodes: Vec<String> = nodes
        .iter()
        .map(|(node, answer)| match answer {
            Ok(()) => format!("{node} up"),
            Err(e) => format!("{node} DOWN ({e})"),
        })
        .collect();
    let queues: Vec<String> = reports
        .iter()
        .map(|q| {
            format!(
                "{} ({} ready, {} consumers)",
                q.name, q.messages, q.consumers
            )
        })
        .collect();
    Ok(format!(
        "nodes: {}; durable queues: {}",
        nodes.join(", "),
        queues.join(", ")
    ))
}

async fn mongodb(settings: &Settings, budget: Duration) -> Result<String, String> {
    let db = store::connect(
        &settings.mongo.uri,
        &settings.mongo.db,
        budget,
        store::Monitoring::Driver,
    )
    .await
    .map_err(|e| e.to_string())?;
    store::ping(&db)
        .await
        .map_err(|e| format!("{} does not answer ping: {e}", settings.mongo.uri))?;
    let missing = migrations::missing_indexes(&db)
        .await
        .map_err(|e| e.to_string())?;
    if !missing.is_empty() {
        return Err(format!(
            "indexes not as in migrations/ (run `kobe init-db`): {}",
            missing.join("; ")
        ));
    }
    Ok(format!(
        "{} answers; database {} has every index of migrations/",
        settings.mongo.uri, settings.mongo.db
    ))
}

async fn redis(settings: &Settings, budget: Duration) -> Result<String, String> {
    let cache = Cache::new(&settings.redis.url, &settings.redis.prefix, budget)
        .map_err(|e| e.to_string())?;
    cache
        .ping()
        .await
        .map_err(|e| format!("{} does not answer PING: {e}", settings.redis.url))?;
    Ok(format!("{} answers PING", settings.redis.url))
}
