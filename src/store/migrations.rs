//! Collection and index specs from `migrations/`, applied by `kobe init-db` and checked by
//! `kobe healthcheck`.
//!
//! Each file describes one collection; each index is written as MongoDB's `listIndexes` shows it
//! (`key`, `name`, `unique`, `expireAfterSeconds`, …). The specs are compiled into the binary, so a
//! container image needs no extra files. Applying them is idempotent: an index that exists with the
//! same keys and options is left alone; one that exists with a different definition is reported as
//! a conflict rather than silently kept or dropped.
//!
//! Index type: DocumentDB's default secondary index is costly to keep up to date (an indexed write
//! costs 2.5× what the same write costs with its *composite* type); where the engine is DocumentDB,
//! indexes are created with `enableCompositeTerm: true`. A MongoDB server would refuse that option,
//! so it is sent only to an engine detected as DocumentDB (its `buildInfo` carries no
//! `gitVersion`), or when `KOBE_MONGODB_INDEX_TYPE=composite` says so.

use std::fmt;

use futures_util::TryStreamExt;
use mongodb::bson::{self, Bson, Document};
use mongodb::{Database, IndexModel};
use serde::Deserialize;

use super::StoreError;
use crate::cause::Cause;

/// The spec files, in the order they are applied.
const SPEC_FILES: [(&str, &str); 14] = [
    ("Tasks.json", include_str!("../../migrations/Tasks.json")),
    (
        "TaskLeases.json",
        include_str!("../../migrations/TaskLeases.json"),
    ),
    (
        "TaskDedup.json",
        include_str!("../../migrations/TaskDedup.json"),
    ),
    (
        "TaskCheckpoint.json",
        include_str!("../../migrations/TaskCheckpoint.json"),
    ),
    (
        "PendingTasks.json",
        include_str!("../../migrations/PendingTasks.json"),
    ),
    (
        "TaskErrorLog.json",
        include_str!("../../migrations/TaskErrorLog.json"),
    ),
    (
        "RawPayload.json",
        include_str!("../../migrations/RawPayload.json"),
    ),
    (
        "ShardMeta.json",
        include_str!("../../migrations/ShardMeta.json"),
    ),
    (
        "Leaders.json",
        include_str!("../../migrations/Leaders.json"),
    ),
    (
        "ScheduleState.json",
        include_str!("../../migrations/ScheduleState.json"),
    ),
    (
        "Workflows.json",
        include_str!("../../migrations/Workflows.json"),
    ),
    (
        "WorkflowSteps.json",
        include_str!("../../migrations/WorkflowSteps.json"),
    ),
    (
        "WorkflowJoins.json",
        include_str!("../../migrations/WorkflowJoins.json"),
    ),
    (
        "Workers.json",
        include_str!("../../migrations/Workers.json"),
    ),
];

/// One collection's spec.
#[derive(Debug, Clone, Deserialize)]
pub struct CollectionSpec {
    pub collection: String,
    #[serde(default)]
    pub description: String,
    /// `bson::Document` keeps key order, which a compound index depends on.
    indexes: Vec<Document>,
}

impl CollectionSpec {
    /// The index models, named.
    pub fn indexes(&self) -> Result<Vec<(String, IndexModel)>, StoreError> {
        self.indexes
            .iter()
            .map(|raw| {
                let model: IndexModel = bson::from_document(raw.clone()).map_err(|e| {
                    StoreError::Migration(
                        format!("{}: bad index spec {raw}: {e}", self.collection).into(),
                    )
                })?;
                let name = model
                    .options
                    .as_ref()
                    .and_then(|o| o.name.clone())
                    .ok_or_else(|| {
                        StoreError::Migration(
                            format!("{}: index spec without a name", self.collection).into(),
                        )
                    })?;
                Ok((name, model))
            })
            .collect()
    }
}

/// Every spec compiled into the binary.
pub fn specs() -> Result<Vec<CollectionSpec>, StoreError> {
    SPEC_FILES
        .iter()
        .map(|(file, text)| {
            serde_json::from_str(text)
                .map_err(|e| StoreError::Migration(Cause::context(format!("migrations/{file}"), e)))
        })
        .collect()
}

pub use crate::domain::IndexChoice;

/// Whether the engine is DocumentDB: a MongoDB server (and the wire-protocol stand-in) names its
/// build in `buildInfo.gitVersion`; DocumentDB's gateway answers without it.
pub async fn is_documentdb(db: &Database) -> Result<bool, StoreError> {
    let info = db.run_command(bson::doc! {"buildInfo": 1}).await?;
    Ok(!info.contains_key("gitVersion"))
}

/// Whether indexes made now are of DocumentDB's composite type.
pub async fn composite(db: &Database, choice: IndexChoice) -> Result<bool, StoreError> {
    Ok(match choice {
        IndexChoice::Auto => is_documentdb(db).await?,
        IndexChoice::Standard => false,
        IndexChoice::Composite => true,
    })
}

/// What applying one item did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Created,
    Found,
    /// Exists with another definition; left untouched.
    Conflict(String),
}

/// One line of `init-db`'s report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub collection: String,
    /// `None` for the collection itself.
    pub index: Option<String>,
    pub change: Change,
    /// An index of DocumentDB's composite type.
    pub composite: bool,
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match &self.index {
            Some(index) => format!("index {}.{index}", self.collection),
            None => format!("collection {}", self.collection),
        };
        let kind = if self.composite { " (composite)" } else { "" };
        match &self.change {
            Change::Created => write!(f, "created {what}{kind}"),
            Change::Found => write!(f, "found   {what}{kind}"),
            Change::Conflict(why) => write!(f, "CONFLICT {what}: {why}"),
        }
    }
}

/// Progress of [`apply`], reported as it happens so a slow index build never looks like a hang.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress<'a> {
    /// One `createIndexes` command is about to build these indexes of `collection`.
    Building {
        collection: &'a str,
        indexes: &'a [String],
    },
    /// A collection or index has been checked or created.
    Done(&'a Outcome),
}

/// Creates what is missing; reports every collection and index, through `progress` as it goes
/// and in the returned list.
///
/// The missing indexes of a collection are built by one `createIndexes` command, which also
/// creates the collection when it does not exist yet. Servers that build indexes in the
/// background (DocumentDB) answer that command at once for a new collection but take seconds per
/// command on an existing one, so one command per collection, not per index, keeps `init-db` on a
/// fresh database well under a second.
#[tracing::instrument(name = "store.migrations.apply", skip_all, fields(db = %db.name()))]
pub async fn apply(
    db: &Database,
    progress: impl FnMut(Progress<'_>),
) -> Result<Vec<Outcome>, StoreError> {
    let composite = composite(db, IndexChoice::Auto).await?;
    apply_with(db, composite, progress).await
}

/// [`apply`], creating missing indexes of DocumentDB's composite type or not (see [`composite`]).
pub(crate) async fn apply_with(
    db: &Database,
    composite: bool,
    mut progress: impl FnMut(Progress<'_>),
) -> Result<Vec<Outcome>, StoreError> {
    let specs = specs()?;
    let existing_collections = db.list_collection_names().await?;
    let mut outcomes = Vec::new();
    let mut report = |outcome: Outcome, progress: &mut dyn FnMut(Progress<'_>)| {
        progress(Progress::Done(&outcome));
        outcomes.push(outcome);
    };
    for spec in &specs {
        let exists = existing_collections.contains(&spec.collection);
        let existing = if exists {
            existing_indexes(db, &spec.collection).await?
        } else {
            Vec::new()
        };
        let mut checked = Vec::new();
        let mut missing = Vec::new();
        for ((name, wanted), raw) in spec.indexes()?.into_iter().zip(&spec.indexes) {
            match existing.iter().find(|(m, _)| index_name(m) == Some(&name)) {
                Some((found, is_composite)) => {
                    let change = match difference(found, &wanted) {
                        None => Change::Found,
                        Some(why) => Change::Conflict(why),
                    };
                    checked.push((name, change, *is_composite));
                }
                None => missing.push((name, raw.clone())),
            }
        }
        if !exists && missing.is_empty() {
            db.create_collection(&spec.collection).await?;
        }
        if !missing.is_empty() {
            let created = create(db, &spec.collection, missing, composite, &mut progress).await?;
            checked.extend(created);
        }
        report(
            Outcome {
                collection: spec.collection.clone(),
                index: None,
                change: if exists {
                    Change::Found
                } else {
                    Change::Created
                },
                composite: false,
            },
            &mut progress,
        );
        for (name, change, composite) in checked {
            report(
                Outcome {
                    collection: spec.collection.clone(),
                    index: Some(name),
                    change,
                    composite,
                },
                &mut progress,
            );
        }
    }
    Ok(outcomes)
}

/// Builds the `missing` indexes of `collection` in one command, and says of each whether the
/// engine made it composite (a server setting may choose the type too).
async fn create(
    db: &Database,
    collection: &str,
    missing: Vec<(String, Document)>,
    composite: bool,
    progress: &mut impl FnMut(Progress<'_>),
) -> Result<Vec<(String, Change, bool)>, StoreError> {
    let names: Vec<String> = missing.iter().map(|(name, _)| name.clone()).collect();
    progress(Progress::Building {
        collection,
        indexes: &names,
    });
    let indexes: Vec<Document> = missing
        .into_iter()
        .map(|(_, mut raw)| {
            if composite {
                raw.insert("enableCompositeTerm", true);
            }
            raw
        })
        .collect();
    db.run_command(bson::doc! {"createIndexes": collection, "indexes": indexes})
        .await?;
    let made = existing_indexes(db, collection).await?;
    Ok(names
        .into_iter()
        .map(|name| {
            let is_composite = made.iter().any(|(m, c)| *c && index_name(m) == Some(&name));
            (name, Change::Created, is_composite)
        })
        .collect())
}

/// Indexes of the specs that are missing or differ, as `Collection.index` with the reason.
pub(crate) async fn missing_indexes(db: &Database) -> Result<Vec<String>, StoreError> {
    let mut problems = Vec::new();
    for spec in specs()? {
        let existing = existing_indexes(db, &spec.collection).await?;
        for (name, wanted) in spec.indexes()? {
            match existing.iter().find(|(m, _)| index_name(m) == Some(&name)) {
                None => problems.push(format!("{}.{name} missing", spec.collection)),
                Some((found, _)) => {
                    if let Some(why) = difference(found, &wanted) {
                        problems.push(format!("{}.{name} differs: {why}", spec.collection));
                    }
                }
            }
        }
    }
    Ok(problems)
}

/// A collection's indexes, each with whether it is of DocumentDB's composite type (which
/// `listIndexes` shows as `enableOrderedIndex`).
async fn existing_indexes(
    db: &Database,
    collection: &str,
) -> Result<Vec<(IndexModel, bool)>, StoreError> {
    let mut cursor = match db.collection::<Document>(collection).list_indexes().await {
        Ok(cursor) => cursor.with_type::<Document>(),
        // A missing collection has no indexes (NamespaceNotFound, code 26).
        Err(e) if matches!(*e.kind, mongodb::error::ErrorKind::Command(ref c) if c.code == 26) => {
            return Ok(Vec::new())
        }
        Err(e) => return Err(e.into()),
    };
    let mut found = Vec::new();
    while let Some(raw) = cursor.try_next().await? {
        let is_composite =
            raw.contains_key("enableOrderedIndex") || raw.contains_key("enableCompositeTerm");
        let model: IndexModel = bson::from_document(raw).map_err(|e| {
            StoreError::Migration(Cause::context(format!("{collection}: an index"), e))
        })?;
        found.push((model, is_composite));
    }
    Ok(found)
}

fn index_name(model: &IndexModel) -> Option<&String> {
    model.options.as_ref().and_then(|o| o.name.as_ref())
}

/// Why `found` is not `wanted`, or `None` when they agree on keys (in order), uniqueness and TTL.
fn difference(found: &IndexModel, wanted: &IndexModel) -> Option<String> {
    let keys = |m: &IndexModel| -> Vec<(String, String)> {
        m.keys
            .iter()
            .map(|(k, v)| (k.clone(), normalize(v)))
            .collect()
    };
    if keys(found) != keys(wanted) {
        return Some(format!("keys {} instead of {}", found.keys, wanted.keys));
    }
    let unique = |m: &IndexModel| m.options.as_ref().and_then(|o| o.unique).unwrap_or(false);
    if unique(found) != unique(wanted) {
        return Some(format!(
            "unique is {} instead of {}",
            unique(found),
            unique(wanted)
        ));
    }
    let ttl = |m: &IndexModel| m.options.as_ref().and_then(|o| o.expire_after);
    if ttl(found) != ttl(wanted) {
        return Some(format!(
            "expireAfterSeconds is {:?} instead of {:?}",
            ttl(found),
            ttl(wanted)
        ));
    }
    None
}

/// Index directions come back as int32, int64 or double depending on the server: compare numbers
/// as numbers.
fn normalize(value: &Bson) -> String {
    match value {
        Bson::Int32(n) => n.to_string(),
        Bson::Int64(n) => n.to_string(),
        Bson::Double(f) if f.fract() == 0.0 => (*f as i64).to_string(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_spec_parses_and_names_its_indexes() {
        let specs = specs().unwrap();
        let names: Vec<&str> = specs.iter().map(|s| s.collection.as_str()).collect();
        assert_eq!(
            names,
            [
                "Tasks",
                "TaskLeases",
                "TaskDedup",
                "TaskCheckpoint",
                "PendingTasks",
                "TaskErrorLog",
                "RawPayload",
                "ShardMeta",
                "Leaders",
                "ScheduleState",
                "Workflows",
                "WorkflowSteps",
                "WorkflowJoins",
                "Workers",
            ]
        );
        for spec in &specs {
            // Collections of a few documents, or written only by `_id`, need no index of their
            // own.
            let small = ["Leaders", "ScheduleState", "WorkflowJoins", "Workers"]
                .contains(&spec.collection.as_str());
            assert_eq!(
                spec.indexes().unwrap().is_empty(),
                small,
                "{}",
                spec.collection
            );
        }
    }

    #[test]
    fn compound_keys_keep_their_order() {
        let specs = specs().unwrap();
        let pending = specs
            .iter()
            .find(|s| s.collection == "PendingTasks")
            .unwrap();
        let (_, model) = pending
            .indexes()
            .unwrap()
            .into_iter()
            .find(|(n, _)| n == "queue_lease_until")
            .unwrap();
        let keys: Vec<&String> = model.keys.keys().collect();
        assert_eq!(keys, ["queue", "done", "lease_until"]);
    }

    #[test]
    fn unique_and_ttl_indexes_are_declared() {
        let specs = specs().unwrap();
        let all: Vec<IndexModel> = specs
            .iter()
            .flat_map(|s| s.indexes().unwrap().into_iter().map(|(_, m)| m))
            .collect();
        assert!(all
            .iter()
            .any(|m| m.options.as_ref().and_then(|o| o.unique) == Some(true)));
        assert!(all
            .iter()
            .any(|m| m.options.as_ref().and_then(|o| o.expire_after).is_some()));
    }

    #[test]
    fn differences_are_explained() {
        let a: IndexModel = bson::from_document(bson::doc! {"key": {"a": 1}, "name": "a"}).unwrap();
        let b: IndexModel =
            bson::from_document(bson::doc! {"key": {"a": 1.0}, "name": "a", "unique": true})
                .unwrap();
        assert_eq!(difference(&a, &a), None);
        assert!(difference(&a, &b).unwrap().contains("unique"));
    }
}
