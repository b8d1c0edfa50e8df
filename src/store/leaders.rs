//! `Leaders` and `ScheduleState`: one replica leads a role (the schedules' firing) while it
//! renews a lease in MongoDB; where each schedule got to, so the next leader goes on from there.

use std::time::Duration;

use mongodb::bson::{doc, DateTime, Document};
use mongodb::{Collection, Database};

use super::{from_now, is_duplicate_key, StoreError};

pub(crate) const LEADERS: &str = "Leaders";
pub(crate) const SCHEDULE_STATE: &str = "ScheduleState";

/// Who leads a role, and until when (unless renewed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leader {
    pub holder: String,
    pub until: DateTime,
}

#[derive(Clone)]
pub struct LeaderRepository {
    leaders: Collection<Document>,
    schedules: Collection<Document>,
}

impl LeaderRepository {
    pub fn new(db: &Database) -> Self {
        Self {
            leaders: db.collection(LEADERS),
            schedules: db.collection(SCHEDULE_STATE),
        }
    }

    /// Takes `role` for `holder` for `lease` if nobody holds it or its lease has passed, or
    /// renews it if `holder` holds it; `false` when another holder's lease is live. One round
    /// trip.
    #[tracing::instrument(name = "store.leaders.hold", skip(self))]
    pub async fn hold(
        &self,
        role: &str,
        holder: &str,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        let now = DateTime::now();
        let taken = self
            .leaders
            .update_one(
                doc! {"_id": role, "$or": [{"holder": holder}, {"until": {"$lt": now}}]},
                doc! {"$set": {"holder": holder, "until": from_now(lease), "renewed_at": now}},
            )
            .upsert(true)
            .await;
        match taken {
            Ok(_) => Ok(true),
            // The role exists and another holder's lease is live: the upsert's insert collides.
            Err(e) if is_duplicate_key(&e) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Lets `role` go now, if `holder` holds it (a replica stopping), so another takes it at once.
    pub async fn release(&self, role: &str, holder: &str) -> Result<(), StoreError> {
        self.leaders
            .update_one(
                doc! {"_id": role, "holder": holder},
                doc! {"$set": {"until": DateTime::now()}},
            )
            .await?;
        Ok(())
    }

    /// Who holds `role`, if anyone ever did.
    pub async fn leader(&self, role: &str) -> Result<Option<Leader>, StoreError> {
        let found = self.leaders.find_one(doc! {"_id": role}).await?;
        Ok(found.and_then(|d| {
            Some(Leader {
                holder: d.get_str("holder").ok()?.to_owned(),
                until: *d.get_datetime("until").ok()?,
            })
        }))
    }

    /// The last slot schedule `name` fired (or started counting from), in ms since the epoch.
    pub(crate) async fn last_slot(&self, name: &str) -> Result<Option<i64>, StoreError> {
        let found = self.schedules.find_one(doc! {"_id": name}).await?;
        Ok(found.and_then(|d| d.get_i64("last_slot").ok()))
    }

    /// Every schedule's last slot, by name.
    pub(crate) async fn last_slots(&self) -> Result<Vec<(String, i64)>, StoreError> {
        use futures_util::TryStreamExt;
        let all: Vec<Document> = self.schedules.find(doc! {}).await?.try_collect().await?;
        Ok(all
            .iter()
            .filter_map(|d| {
                Some((
                    d.get_str("_id").ok()?.to_owned(),
                    d.get_i64("last_slot").ok()?,
                ))
            })
            .collect())
    }

    /// Records that schedule `name` got to `slot` (never moving it back).
    #[tracing::instrument(name = "store.leaders.record_slot", skip(self))]
    pub(crate) async fn record_slot(
        &self,
        name: &str,
        slot: i64,
        task_id: Option<&str>,
    ) -> Result<(), StoreError> {
        let mut set = doc! {"last_slot": slot, "recorded_at": DateTime::now()};
        if let Some(task_id) = task_id {
            set.insert("last_task_id", task_id);
        }
        let written = self
            .schedules
            .update_one(
                doc! {"_id": name, "$or": [{"last_slot": {"$lt": slot}}, {"last_slot": null}]},
                doc! {"$set": set},
            )
            .upsert(true)
            .await;
        match written {
            // Already further along (another leader, for a moment): nothing to do.
            Ok(_) => Ok(()),
            Err(e) if is_duplicate_key(&e) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}
