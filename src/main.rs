use clap::Parser;

fn main() {
    // The plugin probe's child: load one library and report, before any other start-up work.
    let args: Vec<std::ffi::OsString> = std::env::args_os().take(3).collect();
    if args.len() == 3 && args[1] == sage::plugin::probe::PROBE_ARG {
        std::process::exit(sage::plugin::probe::child_main(std::path::Path::new(&args[2])));
    }
    let cli = sage::cli::Cli::parse();
    if let Err(err) = sage::cli::run(cli) {
        eprintln!("error: {err:#}");
        std::process::exit(if sage::error::is_user_error(&err) { 2 } else { 1 });
    }
}
