"""The lab: network namespaces standing in for VMs, a lab `host` namespace where skyguard runs,
and a sealed `internet` namespace (DNS, HTTP/HTTPS echo). See ../shared/SPEC.md section 5."""
