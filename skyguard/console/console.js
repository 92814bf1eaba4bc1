// skyguard's web console: opens the one session its one-time ticket names, with noVNC.
// The ticket is in the URL fragment (never sent in a request); it is removed from the address
// bar at once, and handed to skyguard only on the WebSocket, which redeems it.
import RFB from '/novnc/core/rfb.js';

const status = document.getElementById('status');
function show(state, text) {
    document.body.dataset.state = state;
    status.textContent = text;
}

const ticket = new URLSearchParams(location.hash.slice(1)).get('ticket');
history.replaceState(null, '', location.pathname);
if (!ticket) {
    show('no-ticket', 'no console ticket in the address (ask for one: skyguard admin console-ticket --web)');
} else {
    const scheme = location.protocol === 'https:' ? 'wss' : 'ws';
    const url = `${scheme}://${location.host}/console/ws?ticket=${encodeURIComponent(ticket)}`;
    const rfb = new RFB(document.getElementById('screen'), url);
    rfb.scaleViewport = false;
    rfb.addEventListener('connect', () => show('connected', 'connected'));
    rfb.addEventListener('securityfailure', (e) => show('refused', `refused: ${e.detail.reason}`));
    rfb.addEventListener('disconnect', (e) => {
        if (document.body.dataset.state !== 'refused') {
            show('disconnected', e.detail.clean ? 'session ended' : 'connection lost or refused');
        }
    });
    window.skyguardRfb = rfb;
}
