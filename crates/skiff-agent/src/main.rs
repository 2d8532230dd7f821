fn main() {
    skiff_agent::main()
}
