//! The `tapstream` command: capture daemon and CLI. It parses and dispatches; the work is in
//! [`tapstream::cli`].

use clap::Parser as _;
use tapstream::{
    cli::{
        args::{Cli, Command, FilterCommand},
        control, fleet, oneshot, serve, tools,
    },
    filter::compiler,
};

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Capture(cli) => match cli.action {
            None => oneshot::capture(cli.oneshot),
            Some(action) => control::control(action),
        },
        Command::Daemon(args) => serve::daemon(&args.config),
        Command::CheckConfig { file } => tools::check_config(&file),
        Command::Read(args) => tools::read(*args),
        Command::Ls(args) => tools::ls(*args),
        Command::Fleet(command) => fleet::fleet(command),
        Command::Filter(FilterCommand::Check { expression, file }) => {
            tools::filter_check(&expression, file.as_deref())
        }
        Command::Filter(FilterCommand::CompileChild) => {
            match compiler::run_child(std::io::stdin().lock(), std::io::stdout().lock()) {
                Ok(true) => std::process::exit(0),
                Ok(false) => std::process::exit(2),
                Err(e) => Err(anyhow::Error::new(e).context("compile a filter for the daemon")),
            }
        }
    };
    if let Err(e) = result {
        eprintln!("tapstream: {e:#}");
        std::process::exit(1);
    }
}
