"""The autoscaler: sizes each model's prefill and decode tiers from live load and latency.

`policy` holds what an operator asks for (min / max replicas, load or SLA targets, window,
scale-down delay, step), `decide` turns a window of observations into one explained decision per
tick, and `store` keeps the policies in Consul KV so that they change at run time.
"""
