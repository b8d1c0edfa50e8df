//! A pool of databases that already have Kobe's schema, shared by every test process of a run
//! (and of later runs against the same server).
//!
//! Building indexes is the slow part of a fresh database on a real engine, so each test borrows
//! an initialized database instead of creating one: it takes a lease on a free pool database,
//! empties its collections, and gives the lease back when it ends. A lease whose holder process
//! died is taken back by the next test that finds no free database. Databases are named after a
//! hash of the migration specs, so a schema change starts a new pool instead of reusing an old one.

use std::time::Duration;

use mongodb::bson::{doc, Document};
use mongodb::options::ReturnDocument;
use mongodb::{Collection, Database};

/// Where the leases live.
const CONTROL_DB: &str = "kobetest_pool";

/// A borrowed database; [`Lease::release`] gives it back.
pub struct Lease {
    pub name: String,
    holder: String,
}

fn leases(control: &Database) -> Collection<Document> {
    control.collection("leases")
}

/// `kobetest_<schema hash>`: every pool database name starts with it.
fn namespace() -> String {
    let specs: Vec<String> = kobe::store::migrations::specs()
        .expect("migration specs")
        .iter()
        .map(|spec| format!("{}:{:?}", spec.collection, spec.indexes().expect("indexes")))
        .collect();
    format!(
        "kobetest_{:08x}",
        kobe::domain::shard::fnv1a64(&specs.join("|")) as u32
    )
}

fn alive(pid: i64) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// Takes a free pool database (creating one when none is free), emptied and ready.
pub async fn acquire(uri: &str) -> Lease {
    let client_db = |name: &str| {
        let uri = kobe::config::ServiceUrl::new(uri);
        let name = name.to_owned();
        async move {
            kobe::store::connect(
                &uri,
                &name,
                Duration::from_secs(10),
                kobe::store::Monitoring::Driver,
            )
            .await
            .expect("MongoDB client")
        }
    };
    let control = client_db(CONTROL_DB).await;
    let prefix = namespace();
    let holder = format!("{}-{}", std::process::id(), uuid::Uuid::new_v4().simple());
    let pid = i64::from(std::process::id());
    let claim = doc! {"$set": {"holder": &holder, "pid": pid}};
    let free = doc! {"_id": {"$regex": format!("^{prefix}_")}, "holder": null};
    let mut taken = leases(&control)
        .find_one_and_update(free.clone(), claim.clone())
        .return_document(ReturnDocument::After)
        .await
        .expect("pool lease (is KOBE_TEST_MONGODB_URI set? scripts/test.sh sets it)");
    if taken.is_none() {
        // Leases of test processes that died (killed, or crashed before releasing).
        let mut held = leases(&control)
            .find(doc! {"_id": {"$regex": format!("^{prefix}_")}, "holder": {"$ne": null}})
            .await
            .expect("pool leases");
        use futures_util::TryStreamExt;
        while let Some(lease) = held.try_next().await.expect("pool leases") {
            let dead = lease.get_i64("pid").map(|pid| !alive(pid)).unwrap_or(true);
            if dead {
                let _ = leases(&control)
                    .update_one(
                        doc! {"_id": lease.get_str("_id").unwrap_or_default(), "holder": lease.get("holder").cloned()},
                        doc! {"$set": {"holder": null}},
                    )
                    .await;
            }
        }
        taken = leases(&control)
            .find_one_and_update(free, claim)
            .return_document(ReturnDocument::After)
            .await
            .expect("pool lease");
    }
    let name = match taken {
        Some(lease) => lease.get_str("_id").expect("lease name").to_owned(),
        None => {
            let counter = leases(&control)
                .find_one_and_update(
                    doc! {"_id": format!("{prefix}#counter")},
                    doc! {"$inc": {"next": 1}},
                )
                .upsert(true)
                .return_document(ReturnDocument::After)
                .await
                .expect("pool counter")
                .expect("upserted counter");
            let n = counter
                .get_i32("next")
                .map(i64::from)
                .unwrap_or_else(|_| counter.get_i64("next").expect("counter value"));
            let name = format!("{prefix}_{n}");
            leases(&control)
                .insert_one(doc! {"_id": &name, "holder": &holder, "pid": pid})
                .await
                .expect("new pool lease");
            name
        }
    };
    let db = client_db(&name).await;
    // Idempotent: creates the schema once per database, then only checks it.
    kobe::store::migrations::apply(&db, |_| {})
        .await
        .expect("migrations apply");
    for collection in db.list_collection_names().await.expect("collections") {
        db.collection::<Document>(&collection)
            .delete_many(doc! {})
            .await
            .expect("empty a pool collection");
    }
    Lease { name, holder }
}

impl Lease {
    /// Gives the database back for the next test.
    pub async fn release(&self, uri: &str) {
        if let Ok(control) = kobe::store::connect(
            &kobe::config::ServiceUrl::new(uri),
            CONTROL_DB,
            Duration::from_secs(5),
            kobe::store::Monitoring::Driver,
        )
        .await
        {
            let _ = leases(&control)
                .update_one(
                    doc! {"_id": &self.name, "holder": &self.holder},
                    doc! {"$set": {"holder": null}},
                )
                .await;
        }
    }
}
