use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = voxconv::cli::Cli::parse();
    voxconv::cli::run(cli)
}
