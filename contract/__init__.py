"""The federation's agreement, one floor above the models: the typed scenario
(:mod:`.scenario`), the run directory's layout (:mod:`.rundir`) and the task a site
receives and the reply it returns (:mod:`.task`). Server, sites and harness pass these
typed objects, never raw dictionaries (docs/architecture.md §1)."""
