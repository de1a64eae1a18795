"""The EC2 edge of ipguard, one module per thing it fetches:

  client.py           the shared boto3 client, thread pool, retries, backoff and error classification
  instances.py        the cluster's VPC and EKS cluster name, from the nodes' instances (DescribeInstances)
  enis.py             the IPs and prefixes each node holds (DescribeNetworkInterfaces)
  subnets.py          subnet figures: free addresses, zone, CIDR, tags, free /28 blocks; the subnets tagged
                      for enhanced subnet discovery; CIDR reservations (DescribeSubnets, GetSubnetCidr...)
  instance_types.py   live instance-type limits (DescribeInstanceTypes)
  security_groups.py  security-group rule counts (DescribeSecurityGroups/Rules, prefix lists)
  control_plane.py    the EKS control plane's ENIs (`Amazon EKS <cluster>`): their addresses and subnets
  poller.py           the refresh order and applying the answers to the capacity index
"""
