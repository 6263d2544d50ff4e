"""The user-facing ``ida`` commands, each library first with a thin command layer (``add_arguments``, ``run``).

* ``flash/`` -- ``ida flash``: batch builds, per-chip provisioning, the ledger and keystore (factory staff).
* ``console/`` -- ``ida console``: the technician's serial console and inspection report.
* ``broker/`` -- ``ida broker``: Mosquitto TLS, password and ACL configuration for the provisioned devices.
* ``device_run`` -- ``ida device run``: one simulated device (the real firmware) in the foreground.
* ``devices`` -- ``ida devices``: list devices and set their desired config through a running gateway.
* ``gateway`` -- ``ida gateway``: run the edge gateway.
* ``resolve`` -- ``ida resolve``: one resolution through the gateway engine.
* ``handle`` -- ``ida handle``: administer a handle at its prefix's primary node (native or REST).
* ``identifier`` -- ``ida identifier``: check and normalise identifiers.
"""
