mod hypervisor;

fn main() {
    println!("podvisor");
}
