"""The northbound profiles beside today's contract: a Unified Namespace tree (`uns`) and the Sparkplug B
edge node's stored data (`agent.sparkplug`), both fed by `fanout.ProfileSink` from the monitor's messages."""
