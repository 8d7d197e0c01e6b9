//! Reload (SIGHUP, `lb reload`): the config read again and applied as a diff, without
//! disturbing what did not change. A config that is invalid, or that cannot be resolved on
//! this host, is refused with its error and nothing changes.

use std::{collections::BTreeSet, sync::Arc};

use anyhow::{bail, Context, Result};

use super::{
    setup::{adopt_macs, attach_all, start_engine},
    RunOptions,
};
use crate::{
    config::Config,
    control::{AgentState, Running},
    dataplane::Dataplane,
    plan::Plan,
};

/// Applies the config at `options.config` in place of `running`; returns the new config
/// and a one-line summary of what changed.
pub async fn reload(
    dataplane: &mut Dataplane,
    state: &Arc<AgentState>,
    options: &RunOptions,
    running: &Config,
) -> Result<(Config, String)> {
    let config = options.load_config()?;
    let link = |c: &Config| c.pair.as_ref().map(|p| (p.sync_listen, p.peer));
    let fifo = |c: &Config| c.pair.as_ref().and_then(|p| p.keepalived_fifo.clone());
    for (key, same) in [
        ("pin_path", config.pin_path == running.pin_path),
        (
            "metrics_listen",
            config.metrics_listen == running.metrics_listen,
        ),
        (
            "control_socket",
            config.control_socket == running.control_socket,
        ),
        ("flows.max", config.flows.max == running.flows.max),
        (
            "pair.sync_listen and pair.peer",
            link(&config).unwrap_or_default() == link(running).unwrap_or_default(),
        ),
        ("pair.keepalived_fifo", fifo(&config) == fifo(running)),
    ] {
        if !same {
            bail!("{key} changes only with a restart of the agent (which loses no packet)");
        }
    }
    let mut plan = Plan::resolve(&config, &options.ifaces).await?;
    let previous = state.maps.numbering()?;
    plan.renumber(&previous);
    adopt_macs(&mut plan, &state.maps)?;
    let old_plan = state.plan.get();
    let summary = summarize(&old_plan, &plan);

    // From here on the maps change; if a step fails, the plan in force is put back.
    let old = state.running();
    old.engine.stop();
    match apply(dataplane, state, options, &config, &plan, &old).await {
        Ok(()) => Ok((config, summary)),
        Err(error) => {
            tracing::error!(error = %format!("{error:#}"), "reload failed; putting the running config back");
            apply(dataplane, state, options, running, &old_plan, &old)
                .await
                .with_context(|| {
                    format!("reload failed ({error:#}), and so did putting the running config back")
                })?;
            Err(error)
        }
    }
}

/// Writes `plan`, attaches, and starts an engine that takes over from `old`'s.
async fn apply(
    dataplane: &mut Dataplane,
    state: &Arc<AgentState>,
    options: &RunOptions,
    config: &Config,
    plan: &Plan,
    old: &Running,
) -> Result<()> {
    let previous = state.maps.numbering()?;
    let applied = state
        .maps
        .apply_plan(plan, &previous, true)
        .context("cannot write the plan into the maps")?;
    let mode = options.xdp_mode.unwrap_or(config.xdp_mode);
    let interfaces = attach_all(dataplane, plan, mode, options.force).await?;
    let engine = start_engine(
        plan,
        &state.maps,
        &state.metrics,
        &applied,
        Some(&old.engine),
        state.reload_requests(),
    )
    .await?;
    state.plan.set(plan.clone());
    state.replace_running(Running { engine, interfaces });
    crate::pair::after_reload(&state.maps, plan)?;
    if applied.flows_removed > 0 {
        tracing::info!(
            flows = applied.flows_removed,
            "flows of removed services or backends removed"
        );
    }
    Ok(())
}

/// `services added [...], removed [...], changed [...], N unchanged`.
fn summarize(old: &Plan, new: &Plan) -> String {
    let names = |plan: &Plan| -> BTreeSet<String> {
        plan.services.iter().map(|s| s.name.clone()).collect()
    };
    let (before, after) = (names(old), names(new));
    let added: Vec<_> = after.difference(&before).cloned().collect();
    let removed: Vec<_> = before.difference(&after).cloned().collect();
    let mut changed = Vec::new();
    let mut unchanged = 0;
    for service in &new.services {
        let Ok(was) = old.service(&service.name) else {
            continue;
        };
        let same = serde_json::to_string(was).ok() == serde_json::to_string(service).ok();
        if same {
            unchanged += 1;
        } else {
            changed.push(service.name.clone());
        }
    }
    format!(
        "reloaded: services added [{}], removed [{}], changed [{}], {unchanged} unchanged",
        added.join(", "),
        removed.join(", "),
        changed.join(", ")
    )
}
