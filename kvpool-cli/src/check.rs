use std::process::ExitCode;

use clap::Args;

use crate::{ConfigArgs, OutputArgs};

#[derive(Debug, Args)]
pub(crate) struct CheckArgs {
    #[command(flatten)]
    config: ConfigArgs,
    #[command(flatten)]
    output: OutputArgs,
}

pub(crate) fn run(args: CheckArgs) -> kvpool::Result<ExitCode> {
    let config = args.config.load(None)?;
    let rt = crate::runtime();
    let backend = rt.block_on(kvpool::open(&config))?;
    let info = backend.info().clone();
    rt.block_on(backend.close())?;
    if args.output.json {
        let out = serde_json::json!({
            "ok": true,
            "backend": info.scheme,
            "description": info.description,
            "capabilities": info.capabilities,
            "registered_backends": kvpool::registered_schemes(),
            "config": config.to_json(),
        });
        println!("{out}");
    } else {
        let c = info.capabilities;
        println!("backend:       {}", info.scheme);
        println!("description:   {}", info.description);
        println!("hash_mode:     {}", config.hash_mode);
        println!("capabilities:");
        println!("  shared                 {}", c.shared);
        println!("  persistent             {}", c.persistent);
        println!("  remove                 {}", c.remove);
        println!("  requires_registration  {}", c.requires_registration);
        println!("  capacity_bound         {}", c.capacity_bound);
        println!("  max_batch              {}", opt(c.max_batch));
        println!("  max_value_size         {}", opt(c.max_value_size));
        println!("registered:    {}", kvpool::registered_schemes().join(", "));
        println!("ok");
    }
    Ok(ExitCode::SUCCESS)
}

fn opt(v: Option<usize>) -> String {
    v.map_or_else(|| "unlimited".to_string(), |n| n.to_string())
}
