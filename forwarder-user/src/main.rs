fn main() -> anyhow::Result<()> {
    forwarder::cli::main()
}
