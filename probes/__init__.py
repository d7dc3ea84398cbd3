"""Hook-based probes (capture) and interventions (steering). Installed as `workbench.probes`."""
