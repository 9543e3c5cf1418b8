//! `loadgen`: the Gatehouse load generator.
//!
//! Skeleton only: the coordinator/worker design and the `idle`, `chat`, `offline` and
//! `churn` scenarios are tracked in issue #3. Until then it exits with status 2 and says so,
//! so no script can mistake it for a finished run.

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--version" || a == "-V") {
        println!(
            "loadgen {} (gatehouse protocol v{})",
            env!("CARGO_PKG_VERSION"),
            gatehouse::proto::PROTOCOL_VERSION
        );
        return std::process::ExitCode::SUCCESS;
    }
    eprintln!("loadgen: scenarios are not implemented yet (issue #3); for a memory-per-connection measurement run `cargo run --release --example idle_memory`");
    std::process::ExitCode::from(2)
}
