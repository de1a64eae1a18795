"""A simulated EKS data plane (EC2 addresses and ENIs, ipamd, a scheduler, an autoscaler) for replays.

Never imported by the request path: it is an independent model of what EC2 and the VPC CNI do, so that
ipguard's own figures can be checked against it. It shares only the instance-type limits table and the CNI
settings parser with ipguard.
"""
