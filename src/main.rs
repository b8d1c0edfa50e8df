//! The `kobe` binary: parse the command line, load settings, start telemetry, run the command.

use std::process::ExitCode;

use clap::Parser;
use kobe::cli::{Cli, Command};
use kobe::config::Settings;
use kobe::tasks::Registry;
use kobe::{commands, shutdown, telemetry};

fn main() -> ExitCode {
    // The .env file is read before the command line is parsed, so flags that fall back to
    // variables (`--concurrency` ← KOBE_CONCURRENCY) see its values too.
    let env_file = env_file_argument();
    let dotenv = match &env_file {
        Some(path) => dotenvy::from_path(path),
        None => dotenvy::dotenv().map(drop),
    };
    if let Err(error) = &dotenv {
        if !error.not_found() || env_file.is_some() {
            eprintln!("kobe: cannot read the .env file: {error}");
            return ExitCode::from(2);
        }
    }
    let cli = Cli::parse();
    let settings = match Settings::from_env() {
        Ok(settings) => settings,
        Err(error) => {
            eprintln!("kobe: {error}");
            return ExitCode::from(2);
        }
    };
    telemetry::init(&settings.log_level, settings.log_format);
    telemetry::install_panic_hook();
    tracing::debug!(
        rabbitmq = %settings.rabbitmq_url,
        mongodb = %settings.mongodb_uri,
        db = %settings.mongodb_db,
        redis = %settings.redis_url,
        "settings loaded"
    );

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            tracing::error!(error = %error, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Serve(args) => commands::serve::run(settings, args.addr).await,
            Command::Worker(args) => {
                commands::worker::run(
                    settings,
                    args.into(),
                    Registry::with_builtin_tasks(),
                    shutdown::signal(),
                )
                .await
            }
            Command::InitDb => commands::init_db::run(&settings).await,
            Command::Healthcheck => {
                if commands::healthcheck::run(&settings).await {
                    Ok(())
                } else {
                    return ExitCode::FAILURE;
                }
            }
        }
        .map(|()| ExitCode::SUCCESS)
        .unwrap_or_else(|error| {
            tracing::error!(error = ?error, "kobe failed");
            ExitCode::FAILURE
        })
    });
    // amiquip threads may still be waiting on a dead broker; do not wait for them.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    telemetry::otel::shutdown();
    result
}

/// `--env-file PATH` (or `--env-file=PATH`), looked up before clap parses everything else.
fn env_file_argument() -> Option<std::path::PathBuf> {
    let mut args = std::env::args_os().skip(1);
    while let Some(arg) = args.next() {
        let text = arg.to_string_lossy();
        if text == "--env-file" {
            return args.next().map(Into::into);
        }
        if let Some(path) = text.strip_prefix("--env-file=") {
            return Some(path.into());
        }
    }
    None
}
