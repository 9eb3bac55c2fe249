fn main() -> std::process::ExitCode {
    forwarder::cli::main()
}
