"""tcprouter: route raw TCP to labelled Docker containers with kernel NAT rules."""
