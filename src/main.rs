fn main() -> std::process::ExitCode {
    match voxconv::cli::parse() {
        Ok(cli) => voxconv::cli::run(cli),
        Err(code) => code,
    }
}
