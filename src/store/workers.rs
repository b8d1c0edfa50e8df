//! `Workers`: one small document per running worker, rewritten every couple of seconds with the
//! attempts it runs. It answers "what is running now" exactly and without a scan: a search for
//! `STARTED` and the page's count read the running lists of the workers that beat lately, and
//! then only those attempts' leases. A worker that stops beating (killed, cut off) drops out of
//! the answer within [`LIVE`]; its attempts' leases lapse and others take them over.

use std::time::Duration;

use futures_util::TryStreamExt;
use mongodb::bson::{doc, DateTime, Document};
use mongodb::{Collection, Database};

use super::StoreError;

pub const COLLECTION: &str = "Workers";

/// How often a worker says what it runs, at least.
pub const BEAT: Duration = Duration::from_secs(2);
/// How soon after an attempt starts or ends it says so, at most: the shortest time between two
/// beats, so a worker running thousands of tasks a second writes ten times a second.
pub const BEAT_SPACING: Duration = Duration::from_millis(100);
/// A worker whose last beat is older than this is not counted as running anything.
pub const LIVE: Duration = Duration::from_secs(6);

/// What a worker says of itself at each beat.
#[derive(Debug, Clone)]
pub struct WorkerBeat {
    /// This worker, unique among those running (`kobe-<pid>@<host>/<n>`).
    pub id: String,
    pub host: String,
    pub pid: u32,
    pub concurrency: u16,
    /// The lease ids (`<task id>:<retries>`) of the attempts running here.
    pub running: Vec<String>,
}

#[derive(Clone)]
pub struct WorkerRepository {
    collection: Collection<Document>,
}

impl WorkerRepository {
    pub fn new(db: &Database) -> Self {
        Self {
            collection: db.collection(COLLECTION),
        }
    }

    /// Writes the worker's document: one command, whatever runs.
    #[tracing::instrument(name = "store.workers.beat", skip_all, fields(running = beat.running.len()))]
    pub async fn beat(&self, beat: &WorkerBeat, started_at: DateTime) -> Result<(), StoreError> {
        self.collection
            .update_one(
                doc! {"_id": &beat.id},
                doc! {
                    "$set": {
                        "host": &beat.host,
                        "pid": i64::from(beat.pid),
                        "concurrency": i32::from(beat.concurrency),
                        "running": &beat.running,
                        "beat_at": DateTime::now(),
                        "version": env!("CARGO_PKG_VERSION"),
                    },
                    "$setOnInsert": {"started_at": started_at},
                },
            )
            .upsert(true)
            .await?;
        Ok(())
    }

    /// A worker that stops cleanly says so: it runs nothing any more.
    pub async fn gone(&self, id: &str) -> Result<(), StoreError> {
        self.collection.delete_one(doc! {"_id": id}).await?;
        Ok(())
    }

    /// The lease ids of every attempt running on a worker that beat within [`LIVE`].
    #[tracing::instrument(name = "store.workers.running", skip(self))]
    pub async fn running(&self) -> Result<Vec<String>, StoreError> {
        let since = DateTime::from_millis(
            DateTime::now().timestamp_millis() - i64::try_from(LIVE.as_millis()).unwrap_or(0),
        );
        let live: Vec<Document> = self
            .collection
            .find(doc! {"beat_at": {"$gt": since}})
            .projection(doc! {"running": 1})
            .await?
            .try_collect()
            .await?;
        Ok(live
            .iter()
            .filter_map(|worker| worker.get_array("running").ok())
            .flatten()
            .filter_map(|id| id.as_str().map(str::to_owned))
            .collect())
    }
}
