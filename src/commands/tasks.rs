//! `kobe tasks check FILE`: a tasks file checked offline, as `serve` and `worker` would read it.

use std::path::Path;

use crate::tasks::declared::{self, DeclarationError};
use crate::tasks::Task;

/// Prints each task the file declares, or the first error (file, line, field).
pub fn check(file: &Path) -> Result<(), DeclarationError> {
    let lookup = |name: &str| std::env::var(name).ok();
    let declared = declared::load(file, &lookup)?;
    println!(
        "{}: {} task(s), {} schedule(s)",
        file.display(),
        declared.tasks.len(),
        declared.schedules.len()
    );
    for task in declared.tasks {
        let route = task.route().unwrap_or("default");
        println!(
            "  {:<24} kind={:<8} route={route:<12} time_limit={:?} max_retries={}",
            task.name(),
            task.kind(),
            task.time_limit(),
            task.retry_policy().max_retries
        );
    }
    for schedule in declared.schedules {
        println!(
            "  schedule {:<15} task={:<18} {} missed={:?}",
            schedule.name,
            schedule.fires(),
            schedule.when,
            schedule.missed
        );
    }
    Ok(())
}
