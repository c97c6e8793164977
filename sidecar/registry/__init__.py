"""The registry the instance is kept in: the Consul agent client, the service definition, the claim on an ID, and
`consul-sidecar wait`.
"""
