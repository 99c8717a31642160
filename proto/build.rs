fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=agent.proto");
    tonic_prost_build::configure().compile_protos(&["agent.proto"], &["."])?;
    Ok(())
}
