"""Central mode: a consortium archive that records what every site delivered and checks it on arrival.

Enabled by ``RtHarvest.Central.Enabled`` in the same plugin, in the same kind of Orthanc (not a fork); see
:mod:`rtharvest.central.settings`. A site's export sends its objects (C-STORE or STOW-RS) and, once verified,
posts its de-identified manifest to ``POST /rtharvest/central/deliveries`` (:mod:`rtharvest.central.client`).
"""
