"""Meanings of the built-in drivers' config fields, keyed by `Model.field` (a `description` on the field wins).

Kept as text here so the core never imports a driver; a driver may move these into `Field(description=...)`.
"""

from __future__ import annotations

_SECRET = "read from a file (an absolute path, usually /run/credentials/edge-agent.service/NAME)"

DRIVER_MEANINGS: dict[str, str] = {
    # opcua
    "OpcUaConnection.endpoint": "server address, opc.tcp://host:4840",
    "OpcUaConnection.security_policy": "OPC UA security policy",
    "OpcUaConnection.security_mode": "message security; default SignAndEncrypt with Basic256Sha256, else None",
    "OpcUaConnection.certificate_file": "client certificate (generated into state_dir when absent)",
    "OpcUaConnection.private_key_file": "client private key (generated with the certificate when absent)",
    "OpcUaConnection.server_certificate_file": "pin the server's certificate: only this one is trusted",
    "OpcUaConnection.application_uri": "application URI of the client certificate",
    "OpcUaConnection.username": "user name for a user-token login",
    "OpcUaConnection.password_file": "password of username, " + _SECRET,
    "OpcUaConnection.password_env": "password of username, read from this environment variable",
    "OpcUaConnection.publishing_interval_ms": "how often the server sends the changes of the subscription",
    "OpcUaConnection.timeout_s": "timeout of one request and of the connect",
    "OpcUaConnection.watchdog_interval_s": "how often the link is checked; a dead server is noticed within this",
    "OpcUaTag.node": "node id: ns=2;s=Name, i=, g=, b=, or nsu=URI;s=Name (survives namespace index changes)",
    "OpcUaTag.sampling_interval_ms": "server-side sampling; default 0 (every change)",
    "OpcUaTag.queue_size": "server-side queue of changes between publishes; default derived from the intervals",
    "OpcUaCommand.object": "node id of the object that owns the method (kind method or reset)",
    "OpcUaCommand.method": "node id of the method called (kind method or reset)",
    # modbus
    "ModbusConnection.transport": "tcp (host, port) or rtu (serial_port and its line settings)",
    "ModbusConnection.host": "device address (tcp)",
    "ModbusConnection.port": "TCP port (tcp)",
    "ModbusConnection.unit_id": "Modbus unit (slave) id",
    "ModbusConnection.serial_port": "serial device (rtu), e.g. /dev/ttyUSB0 or /dev/ttySC0",
    "ModbusConnection.baudrate": "line speed (rtu)",
    "ModbusConnection.parity": "N none, E even, O odd (rtu)",
    "ModbusConnection.stopbits": "stop bits (rtu)",
    "ModbusConnection.bytesize": "data bits (rtu)",
    "ModbusConnection.poll_interval_ms": "time between polls of every tag",
    "ModbusConnection.timeout_s": "timeout of one request",
    "ModbusConnection.retries": "retries of a request that timed out before the link counts as lost",
    "ModbusConnection.max_gap": "unused registers (or bits) one coalesced read may span",
    "ModbusConnection.max_registers_per_request": "largest register read; lower it for devices that refuse 125",
    "ModbusConnection.max_bits_per_request": "largest coil or discrete read",
    "ModbusTag.table": "holding, input (registers), coil or discrete (bits)",
    "ModbusTag.address": "0-based address in the table (register 40001 is holding address 0)",
    "ModbusTag.type": "data type; default uint16, bool for bit tables and bit tags",
    "ModbusTag.length": "registers of a string tag (2 characters each)",
    "ModbusTag.byte_order": "byte order within a register",
    "ModbusTag.word_order": "register order of 32- and 64-bit values",
    "ModbusTag.bit": "a bool from one bit of a register, 0 = least significant; not writable",
    # serial_printer
    "SerialPrinterConnection.serial_port": "printer's serial device, e.g. /dev/ttyACM0",
    "SerialPrinterConnection.baudrate": "line speed",
    "SerialPrinterConnection.flavor": "firmware dialect",
    "SerialPrinterConnection.poll_interval_s": "how often temperatures and progress are asked for",
    "SerialPrinterConnection.max_hotend_temp": "set_temperature refuses a hotend target above this",
    "SerialPrinterConnection.max_bed_temp": "set_temperature refuses a bed target above this",
    "SerialPrinterConnection.process_id_pattern": "regex on the printed file's name whose first group is the MPM "
    "process id (default: the name without extension)",
    "SerialPrinterConnection.ok_timeout_s": "time the firmware has to acknowledge a line",
    "SerialPrinterConnection.long_command_timeout_s": "acknowledge time of slow commands (homing, heating)",
    "SerialPrinterConnection.handshake_timeout_s": "time the firmware has to answer after the port opens",
    "SerialPrinterConnection.max_line_bytes": "longest line read from the printer",
    "SerialPrinterConnection.max_in_flight": "lines sent before their acknowledgements arrive",
    "SerialPrinterConnection.gcode_dir": "folder of G-code files that commands may stream",
    "SerialPrinterCommand.gcode": "fixed G-code text sent by a kind = gcode command",
    # mtconnect
    "MTConnectConnection.url": "the MTConnect agent's base URL, e.g. http://10.0.0.5:5000",
    "MTConnectConnection.device": "device name or uuid at the agent; may be left out when it has one device",
    "MTConnectConnection.poll_interval_ms": "time between sample requests",
    "MTConnectConnection.count": "observations asked for per sample request",
    "MTConnectConnection.timeout_s": "timeout of one HTTP request",
    "MTConnectConnection.process_id_item": "data item (id or name) holding the process id; default the first PART_ID",
    "MTConnectTag.item": "the data item, by id or else by name",
    # file_drop
    "FileDropConnection.directory": "folder the machine drops its reports in (top level only)",
    "FileDropConnection.patterns": "file name patterns picked up",
    "FileDropConnection.processed_dir": "where a delivered report is moved (not directory itself)",
    "FileDropConnection.failed_dir": "where an unreadable report is moved, with an error file",
    "FileDropConnection.stable_s": "a file is read once its size and time have not changed for this long",
    "FileDropConnection.max_file_bytes": "a larger file is failed unread",
    "FileDropConnection.rescan_s": "the folder is rescanned this often besides change notifications",
}
