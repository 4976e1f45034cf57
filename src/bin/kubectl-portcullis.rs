//! `kubectl portcullis`: ask for access, decide on requests, and see why a grant is where it is.
//! A kubectl plugin: on PATH as `kubectl-portcullis`, it uses the kubeconfig (`KUBECONFIG`,
//! `--context`), the namespace (`-n`, else the context's), and impersonation (`--as`,
//! `--as-group`) as kubectl does.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};
use jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::config::KubeConfigOptions;
use kube::{Client, Config, ResourceExt};
use portcullis::api::{AccessApproval, AccessGrant, Decision, GrantPhase};
use portcullis::cli;
use serde_json::json;

#[derive(Parser)]
#[command(
    name = "kubectl-portcullis",
    version,
    about = "Just-in-time access to Azure VMs: request, approve, explain"
)]
struct Cli {
    /// Namespace (default: the kubeconfig context's, else `default`).
    #[arg(short = 'n', long, global = true)]
    namespace: Option<String>,
    /// kubeconfig context.
    #[arg(long, global = true)]
    context: Option<String>,
    /// Act as this user (impersonation, like kubectl --as).
    #[arg(long = "as", global = true)]
    as_user: Option<String>,
    /// Act as a member of this group (repeatable, like kubectl --as-group).
    #[arg(long = "as-group", global = true)]
    as_groups: Vec<String>,
    /// Output format.
    #[arg(short = 'o', long, global = true, value_enum, default_value = "table")]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Table,
    Yaml,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Ask for access to a VM; waits and prints the outcome.
    Request(RequestArgs),
    /// Approve a grant waiting for approval.
    Approve(DecideArgs),
    /// Reject a grant waiting for approval.
    Reject(DecideArgs),
    /// Grants waiting for a decision that you may make (asked of the admission webhook with a
    /// dry run).
    Pending,
    /// Grants in the namespace.
    List,
    /// Withdraw a grant: its rules close now.
    Revoke { grant: String },
    /// Why a grant is where it is: status, conditions, decisions and Events.
    Why { grant: String },
    /// Shell completion script.
    Completion { shell: clap_complete::Shell },
}

#[derive(Args)]
struct RequestArgs {
    /// The JitPolicy to request under.
    #[arg(long)]
    policy: String,
    /// VM name or resource ID.
    #[arg(long)]
    vm: String,
    /// Port to open (repeatable).
    #[arg(long = "port", required = true)]
    ports: Vec<u16>,
    /// Source address or CIDR.
    #[arg(long)]
    source: String,
    /// How long (ISO 8601, e.g. PT1H).
    #[arg(long, default_value = "PT1H")]
    duration: String,
    #[arg(long)]
    justification: String,
    /// Grant name (default: generated).
    #[arg(long)]
    name: Option<String>,
    /// Seconds to wait for an outcome (0: do not wait).
    #[arg(long, default_value_t = 60)]
    wait: u64,
}

#[derive(Args)]
struct DecideArgs {
    grant: String,
    #[arg(long)]
    comment: Option<String>,
}

#[derive(Debug, thiserror::Error)]
enum CliError {
    #[error("kubeconfig: {0}")]
    Config(#[from] kube::config::KubeconfigError),
    #[error("{0}")]
    Kube(#[from] kube::Error),
    #[error("{0}")]
    Serde(#[from] serde_json::Error),
    #[error("{0}")]
    Yaml(#[from] serde_yaml::Error),
    #[error("{0}")]
    Failed(String),
}

async fn client(cli: &Cli) -> Result<(Client, String), CliError> {
    let options = KubeConfigOptions {
        context: cli.context.clone(),
        ..Default::default()
    };
    let mut config = Config::from_kubeconfig(&options).await?;
    if let Some(user) = &cli.as_user {
        config.auth_info.impersonate = Some(user.clone());
    }
    if !cli.as_groups.is_empty() {
        config.auth_info.impersonate_groups = Some(cli.as_groups.clone());
    }
    let namespace = cli
        .namespace
        .clone()
        .unwrap_or_else(|| config.default_namespace.clone());
    Ok((Client::try_from(config)?, namespace))
}

fn print<T: serde::Serialize>(
    output: Output,
    value: &T,
    table: impl FnOnce() -> String,
) -> Result<(), CliError> {
    match output {
        Output::Table => println!("{}", table()),
        Output::Json => println!("{}", serde_json::to_string_pretty(value)?),
        Output::Yaml => print!("{}", serde_yaml::to_string(value)?),
    }
    Ok(())
}

/// The grant's Events (reason, note), oldest first.
async fn events(client: &Client, ns: &str, name: &str) -> Result<Vec<(String, String)>, CliError> {
    let api: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), ns);
    let mut items: Vec<_> = api
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
        .collect();
    items.sort_by_key(|e| e.metadata.creation_timestamp.as_ref().map(|t| t.0));
    Ok(items
        .into_iter()
        .map(|e| (e.reason.unwrap_or_default(), e.note.unwrap_or_default()))
        .collect())
}

/// Whether the caller may decide on the grant: the admission webhook says so for a server-side
/// dry run of a decision (its rules, who may approve what, live there and nowhere else).
async fn may_decide(approvals: &Api<AccessApproval>, grant: &str) -> bool {
    let Ok(probe) = serde_json::from_value::<AccessApproval>(json!({
        "apiVersion": "portcullis.dev/v1alpha1", "kind": "AccessApproval",
        "metadata": {"generateName": format!("{grant}-")},
        "spec": {"grantRef": {"name": grant}, "decision": "Approve"},
    })) else {
        return false;
    };
    let dry_run = PostParams {
        dry_run: true,
        ..Default::default()
    };
    approvals.create(&dry_run, &probe).await.is_ok()
}

/// Waits until the grant is open, denied, waiting for approval or over.
async fn outcome(
    api: &Api<AccessGrant>,
    name: &str,
    wait: Duration,
) -> Result<AccessGrant, CliError> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let g = api.get(name).await?;
        let settled = g.status.as_ref().is_some_and(|s| {
            let ready = portcullis::api::condition::find(&s.conditions, "Ready");
            match s.phase {
                Some(GrantPhase::Active) => ready.is_some_and(|c| c.status == "True"),
                Some(GrantPhase::Pending) => ready.is_some_and(|c| c.reason == "AwaitingApproval"),
                Some(_) => true,
                None => false,
            }
        });
        if settled || tokio::time::Instant::now() >= deadline {
            return Ok(g);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn run(cli: Cli) -> Result<(), CliError> {
    if let Command::Completion { shell } = &cli.command {
        clap_complete::generate(
            *shell,
            &mut Cli::command(),
            "kubectl-portcullis",
            &mut std::io::stdout(),
        );
        return Ok(());
    }
    let (client, ns) = client(&cli).await?;
    let grants: Api<AccessGrant> = Api::namespaced(client.clone(), &ns);
    let now = Timestamp::now();
    match &cli.command {
        Command::Request(r) => {
            let mut metadata = json!({});
            match &r.name {
                Some(name) => metadata["name"] = json!(name),
                None => {
                    metadata["generateName"] = json!(format!(
                        "{}-",
                        r.vm.rsplit('/').next().unwrap_or("vm").to_ascii_lowercase()
                    ))
                }
            }
            let grant: AccessGrant = serde_json::from_value(json!({
                "apiVersion": "portcullis.dev/v1alpha1", "kind": "AccessGrant",
                "metadata": metadata,
                "spec": {
                    "policyRef": {"name": r.policy}, "virtualMachine": r.vm, "ports": r.ports,
                    "sourceAddressPrefix": r.source, "duration": r.duration,
                    "justification": r.justification,
                },
            }))?;
            let created = grants.create(&PostParams::default(), &grant).await?;
            let name = created.name_any();
            eprintln!("accessgrant/{name} created");
            let g = if r.wait == 0 {
                created
            } else {
                outcome(&grants, &name, Duration::from_secs(r.wait)).await?
            };
            let phase = g.status.as_ref().and_then(|s| s.phase);
            print(cli.output, &g, || cli::why(&g, &[], now))?;
            if phase == Some(GrantPhase::Denied) {
                return Err(CliError::Failed(format!("accessgrant/{name} was denied")));
            }
        }
        Command::Approve(d) | Command::Reject(d) => {
            let decision = match cli.command {
                Command::Approve(_) => Decision::Approve,
                _ => Decision::Reject,
            };
            let approval: AccessApproval = serde_json::from_value(json!({
                "apiVersion": "portcullis.dev/v1alpha1", "kind": "AccessApproval",
                "metadata": {"generateName": format!("{}-", d.grant)},
                "spec": {"grantRef": {"name": d.grant}, "decision": decision.as_str(), "comment": d.comment},
            }))?;
            let approvals: Api<AccessApproval> = Api::namespaced(client.clone(), &ns);
            let made = approvals.create(&PostParams::default(), &approval).await?;
            print(cli.output, &made, || {
                format!(
                    "accessapproval/{} created: {} accessgrant/{}",
                    made.name_any(),
                    decision.as_str(),
                    d.grant
                )
            })?;
        }
        Command::Pending => {
            let approvals: Api<AccessApproval> = Api::namespaced(client.clone(), &ns);
            let mut mine = Vec::new();
            for g in grants.list(&ListParams::default()).await?.items {
                if cli::is_waiting(&g) && may_decide(&approvals, &g.name_any()).await {
                    mine.push(g);
                }
            }
            print(cli.output, &mine, || cli::table(&mine, now))?;
        }
        Command::List => {
            let items = grants.list(&ListParams::default()).await?.items;
            print(cli.output, &items, || cli::table(&items, now))?;
        }
        Command::Revoke { grant } => {
            grants.delete(grant, &DeleteParams::default()).await?;
            println!("accessgrant/{grant} revoked: its rules are being closed");
        }
        Command::Why { grant } => {
            let g = grants.get(grant).await?;
            // Events are a help, not a need: a user who may not read them still gets the rest.
            let events = match events(&client, &ns, grant).await {
                Ok(events) => events,
                Err(e) => vec![("(not readable)".to_string(), e.to_string())],
            };
            print(cli.output, &g, || cli::why(&g, &events, now))?;
        }
        Command::Completion { .. } => {}
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
