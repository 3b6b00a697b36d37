"""What every layer above the probes shares: the event contract (`events`), who a person is
(`identity`), sessions as the tracker announces them (`sessions`), and reads of /proc
(`procfs`).  It imports nothing of ours but `probes`; see ARCHITECTURE.md."""
