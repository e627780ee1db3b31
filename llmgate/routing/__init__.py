"""
Routing: which deployment serves a request, and what happens when an
upstream attempt fails before anything reached the client.

A public model has one or more deployments (L{llmgate.config.Deployment})
and fallback models. L{balance} picks among them, L{breaker} keeps the
deployments that keep failing out of the pick, and L{attempts} retries a
failed attempt on another deployment while the client has seen nothing.
"""
