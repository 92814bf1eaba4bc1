"""A fleet of skyguard hosts on a shared store (etcd): membership and status, signed policy
distribution, and hosts that witness (cosign) each other's signed logs.

    store.py    the store interface; etcd.py its etcd implementation (v3 JSON gateway)
    keys.py     the key layout; signing.py signed policies; agent.py the per-host part
    witnessing.py  what a witness checks beyond its own state; alerts.py the alerts it raised
    publisher.py   this host's checkpoint for the witnesses; peers.py peers' keys pinned
    admin.py       what an operator does from anywhere: push, the fleet's view
    daemon_hook.py  how the daemon hosts the agent
"""
